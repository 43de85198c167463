"""Training: ``TrainConfig`` (the whole run config, recorded in the run), ``train`` (the one loop),
evaluation, and building a run's model from its checkpoints.

``TrainConfig`` imports no torch; ``train`` and ``TrainResult`` load the loop on first use.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str):
    if name in ("train", "TrainResult"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
