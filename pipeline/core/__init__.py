"""Shared core: params and paths, data set access, image I/O and preprocessing, backbones, heads,
the training toolkit, caches, metrics, atomic writes, threads and distributed runs."""
