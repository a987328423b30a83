"""The workloads of ``fast3d bench``, registered when the bench runs (:func:`specs`), not by
``import fast3d``: each op's own (``fast3d.ops.<op>.bench``, registered as its package loads) and
the model-level ones here, which time whole training steps, inference and data generation through
the same harness:

* ``lgm-step`` (:mod:`.lgm`): LGM's training step and the rasterizer's share of it; fast3d's
  rasterizer backends vs gsplat.
* ``lgm-infer`` (:mod:`.lgm`): LGM images-in to Gaussians-out latency.
* ``lrm-step`` (:mod:`.lrm`): LRM's training step at VFusion3D's stage resolutions 128 and 384;
  fast3d's triplane renderer vs the PyTorch one, with peak memory.
* ``ttr-step`` (:mod:`.ttr`): the multi-view DiT's training step with its MFU; fast3d's attention
  processor vs diffusers' default.
* ``datagen`` (:mod:`.datagen`): procedural multi-view data generation.
* ``generate`` (:mod:`.generate`): ``fast3d generate``'s image in to PLY out (multi-view sampling
  + LGM) and each stage's share; fast3d's attention and rasterizer vs diffusers' processor + gsplat.
* ``refine`` (:mod:`.refine`): one SDS step of ``fast3d refine`` (Magic-Boost) and the rasterizer's
  and attention's share; the same peers as ``generate``.

The backends of a model-level op are those of the kernel op it exercises (registered under the
model-level op's name with the same availability), so ``speedup_vs`` reads as for the ops: against
the PyTorch reference (``torch``) and the peer libraries (baselines) measured in the same run.
Importing this package registers them; models load only when a workload runs. Full sizes are what
a GPU session runs; ``--quick`` shrinks each to a CPU-sized model.
"""

import fast3d.ops.attention  # noqa: F401  (each op package registers its workloads as it loads)
import fast3d.ops.composite  # noqa: F401
import fast3d.ops.rasterization  # noqa: F401
import fast3d.ops.triplane  # noqa: F401
from fast3d.bench.spec import BenchSpec, registered
from fast3d.bench.workloads import datagen, generate, lgm, lrm, refine, ttr

__all__ = ["datagen", "generate", "lgm", "lrm", "refine", "ttr", "specs"]


def specs() -> dict[str, BenchSpec]:
    """Every registered workload spec (op or model-level), by op name, sorted."""
    return registered()
