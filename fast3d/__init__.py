"""fast3d: fast kernels, a DeepSpeed training stack and a profiling harness for feed-forward 3D
generation. Public API; ``fast3d info`` shows which backends this machine can run."""

import torch  # noqa: F401  (loads libtorch before the native extension is imported)

from fast3d import backends, io
from fast3d.ops.attention import multiview_attention
from fast3d.ops.composite import composite
from fast3d.ops.rasterization import rasterization
from fast3d.ops.triplane import render_triplane, triplane_sample

__version__ = "0.1.0"

__all__ = ["backends", "io", "composite", "multiview_attention", "rasterization", "render_triplane",
           "triplane_sample", "__version__"]
