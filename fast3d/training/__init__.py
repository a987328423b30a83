"""Training: the TTR timestep sampler (DeepSpeed engine setup, losses, EMA and checkpoints land
with the training recipes)."""

from fast3d.training.ttr import SOURCES, TTRConfig, TTRSampler

__all__ = ["SOURCES", "TTRConfig", "TTRSampler"]
