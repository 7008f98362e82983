"""Benchmarks shipped with the package (``denser bench ...``)."""
