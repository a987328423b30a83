"""Fails unless every C++/CUDA file under csrc/ is formatted as .clang-format says, by the
clang-format version pinned in pyproject.toml's dev extra (releases format differently).

Run from the repository root: python .ci/check_format.py  (fix with: clang-format -i <files>)
"""

import glob
import re
import shutil
import subprocess
import sys

pin = re.search(r'"clang-format==([0-9.]+)"', open("pyproject.toml").read())
if pin is None:
    sys.exit("pyproject.toml pins no clang-format==X in its dev extra")
exe = shutil.which("clang-format")
if exe is None:
    sys.exit(f"clang-format not found: pip install clang-format=={pin.group(1)} (or pip install -e .[dev])")
version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
if f"version {pin.group(1)}" not in version:
    sys.exit(f"{exe} is {version!r}; the pinned one is {pin.group(1)}: pip install clang-format=={pin.group(1)}")
files = sorted(f for ext in ("h", "cpp", "cu", "cuh") for f in glob.glob(f"csrc/**/*.{ext}", recursive=True))
if not files:
    sys.exit("no C++/CUDA files under csrc/")
r = subprocess.run([exe, "--dry-run", "--Werror", *files], capture_output=True, text=True)
if r.returncode != 0:
    print(r.stderr[-20000:], file=sys.stderr)
    sys.exit(f"clang-format: files under csrc/ are not formatted; run: clang-format -i {' '.join(files)}")
print(f"{len(files)} C++/CUDA files formatted ({version})")
