"""The DVC stages, one module each, every one a `run(params, paths...)` that imports no other stage."""
