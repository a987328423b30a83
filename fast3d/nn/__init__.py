"""nn.Module wrappers of fast3d's ops and the diffusers attention processor.

Imported lazily, so `import fast3d.nn` costs nothing until a module is used and a missing optional
dependency (diffusers, for the processor) only fails the module that needs it."""

import importlib

_WHERE = {
    "GaussianRenderer": "fast3d.nn.gaussians",
    "ImageTokenAttnProcessor": "fast3d.nn.attention",
    "MultiViewAttnProcessor": "fast3d.nn.attention",
    "TriplaneMLP": "fast3d.nn.triplane",
    "TriplaneRenderer": "fast3d.nn.triplane",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'fast3d.nn' has no attribute {name!r}")
