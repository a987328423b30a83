"""Model-level workloads of ``fast3d bench``: whole training steps and inference of the models,
timed, modelled and recorded through the same harness as the ops (``fast3d.bench``).

* ``lgm-step`` (:mod:`.lgm`): LGM's training step and the rasterizer's share of it; fast3d's
  rasterizer backends vs gsplat.
* ``lgm-infer`` (:mod:`.lgm`): LGM images-in to Gaussians-out latency.
* ``lrm-step`` (:mod:`.lrm`): LRM's training step at VFusion3D's stage resolutions 128 and 384;
  fast3d's triplane renderer vs the PyTorch one, with peak memory.
* ``ttr-step`` (:mod:`.ttr`): the multi-view DiT's training step with its MFU; fast3d's attention
  processor vs diffusers' default.

The backends of a model-level op are those of the kernel op it exercises (registered under the
model-level op's name with the same availability), so ``speedup_vs`` reads as for the ops: against
the PyTorch reference (``torch``) and the peer libraries (baselines) measured in the same run.
Importing this package registers them (``import fast3d`` does); models load only when a workload
runs. Full sizes are what a GPU session runs; ``--quick`` shrinks each to a CPU-sized model.
"""

from fast3d.models.bench import lgm, lrm, ttr

__all__ = ["lgm", "lrm", "ttr"]
