"""The pytest-benchmark cases (``pytest bench --benchmark-only``) and the recorded results
(``bench/results/``). The runners live in the package, ``denser.bench``: ``denser bench``,
``python -m denser.bench``, or ``python -m bench`` from a clone."""
