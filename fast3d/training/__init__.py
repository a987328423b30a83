"""Training: the DeepSpeed loop shared by the recipes (config, engine, checkpoints with exact
resume, EMA, metrics; fast3d.training.loop), the recipes (fast3d.training.recipes) and the TTR
timestep sampler. Submodules import DeepSpeed lazily; this package imports only the sampler."""

from fast3d.training.ttr import SOURCES, TTRConfig, TTRSampler

__all__ = ["SOURCES", "TTRConfig", "TTRSampler"]
