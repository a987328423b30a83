"""Fails unless the installed fast3d._C has CUDA compiled in and every csrc/**/*.cu produced an
object in that build (setup.py records them in fast3d/_build_info.json)."""

import glob
import sys

import torch  # noqa: F401  (libtorch before the extension)

from fast3d import _native

reason = _native.unavailable_reason()
if reason:
    sys.exit(f"native extension missing: {reason}")
info = _native.build_info()
if not _native.built_with_cuda():
    sys.exit(f"fast3d._C was built without CUDA: {info.get('cuda_how')}")
sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
objects = info.get("cuda_objects_bytes", {})
missing = [s for s in sources if objects.get(s, 0) <= 0]
if missing:
    sys.exit(f"these .cu files were not compiled into fast3d._C: {missing}")
print(f"{len(sources)} .cu files compiled for sm_{', sm_'.join(info['cuda_archs'])} with nvcc {info['nvcc']}:")
for s in sources:
    print(f"  {s}: {objects[s]} bytes of objects")
