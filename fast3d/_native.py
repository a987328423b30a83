"""Loads the native extension ``fast3d._C`` lazily.

A missing or broken build never breaks ``import fast3d``: the reason is recorded and reported by
``fast3d info`` and by the backend registry, and only the ``cpu`` / ``cuda`` backends are affected.
"""

from __future__ import annotations

import functools
import importlib
import json
import os


@functools.cache
def _load():
    try:
        return importlib.import_module("fast3d._C"), None
    except Exception as e:  # ImportError, OSError from a bad .so, undefined symbols...
        return None, (f"native extension fast3d._C not loadable ({type(e).__name__}: {e}); "
                      "rebuild with: pip install --no-build-isolation -e .")


def module():
    """The extension module; raises RuntimeError with the reason when it is missing."""
    mod, reason = _load()
    if mod is None:
        raise RuntimeError(reason)
    return mod


def unavailable_reason() -> str | None:
    return _load()[1]


def built_with_cuda() -> bool:
    mod, _ = _load()
    return bool(mod is not None and mod.with_cuda())


@functools.cache
def build_info() -> dict:
    """What setup.py built: sources, CUDA toolkit and archs, or why CUDA was not built."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
