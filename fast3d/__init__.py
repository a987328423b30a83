"""fast3d: fast kernels, a DeepSpeed training stack and a profiling harness for feed-forward 3D
generation. Public API; ``fast3d info`` shows which backends this machine can run."""

import torch  # noqa: F401  (loads libtorch before the native extension is imported)

from fast3d import backends
from fast3d.ops.composite import composite

__version__ = "0.1.0"

__all__ = ["backends", "composite", "__version__"]
