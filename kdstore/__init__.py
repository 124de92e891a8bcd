"""kdstore: a precomputed-feature store for text-to-video distillation."""

__version__ = "0.1.0"
