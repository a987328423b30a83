"""`fast3d datagen pipeline`: synthetic multi-view data from pretrained models (Bootstrap3D, VFusion3D).

prompts (a file or templates) -> text-to-image (diffusers PixArt-alpha) -> image-to-multi-view
(diffusers Stable Video Diffusion / SV3D: an orbit of V frames) -> quality filter (VFusion3D's SVM on
DINOv2 features) -> optional recaption (transformers BLIP) -> shards with ``source=synthetic`` that
:class:`fast3d.data.MultiViewDataset` reads. Every model is a local directory named in the config
(never downloaded) or ``random-tiny``.

* :mod:`~fast3d.datagen.pipeline.config`: :class:`PipelineConfig`, :func:`load_config`, per-item prompts
  and seeds;
* :mod:`~fast3d.datagen.pipeline.stages`: the stage plug-ins;
* :mod:`~fast3d.datagen.pipeline.engine`: the resumable, split-independent run.

The CLI calls :func:`run_config` (config path, output directory, local worker processes).
"""

from __future__ import annotations

from fast3d.datagen.pipeline.config import PipelineConfig, item, load_config
from fast3d.datagen.pipeline.engine import Stages, build_stages, generate, orbit, run
from fast3d.datagen.pipeline.stages import Filter, ImageToMultiView, Recaptioner, TextToImage

__all__ = ["PipelineConfig", "load_config", "item", "Stages", "build_stages", "generate", "orbit", "run", "run_config",
           "TextToImage", "ImageToMultiView", "Filter", "Recaptioner"]


def run_config(config: str, out: str, workers: int = 1) -> list[dict]:
    """Load the YAML `config` and generate into `out` (see :func:`run`); one counts dict per worker."""
    return run(out, load_config(config), workers)
