"""Benchmarks of the loss core (and, later, the loop). ``python -m bench --help``."""
