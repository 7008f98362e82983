"""denser: on-policy post-training of language models, sparse to dense.

    import denser
    run_dir = denser.train(denser.TrainConfig(model="tiny", steps=2), objective="grpo")
    result = denser.evaluate(run_dir, samples=8)
    record = denser.continual(objective="grpo", tasks=["addition", "compare"], model="tiny")

``denser.train``, ``denser.evaluate``, ``denser.continual`` (:mod:`denser.api`) and ``denser.TrainConfig`` are loaded on
first use: ``import denser`` (and so the command line's start) does not wait for transformers.
"""

__version__ = "0.1.0"
__all__ = ["TrainConfig", "continual", "evaluate", "train"]


def __getattr__(name: str):
    if name == "continual":  # the package denser.continual, callable (see its _CallablePackage)
        import denser.continual

        return denser.continual
    if name in ("train", "evaluate"):
        from denser import api  # lazily, for start-up time (see the module docstring)

        return getattr(api, name)
    if name == "TrainConfig":
        from denser.trainers.config import TrainConfig  # lazily, as above

        return TrainConfig
    raise AttributeError(f"module 'denser' has no attribute {name!r}")
