"""denser: on-policy post-training of language models, sparse to dense."""

__version__ = "0.1.0"
