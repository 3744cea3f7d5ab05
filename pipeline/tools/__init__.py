"""Research and benchmark commands built on the stages: sweep, lr-find, noise-check, benchmarks."""
