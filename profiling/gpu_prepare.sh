#!/usr/bin/env bash
# Prepare a GPU validation run, once, on a CPU machine with a package registry (see the project's
# GPU notes). The reference GPU machine has Python 3.12, torch 2.11.0 (CUDA 13.0) and Triton 3.6 but
# no registry, and lacks diffusers, deepspeed, lpips, gsplat and xformers. This script fills the
# git-ignored ./.whl (kept under ~60 MB) with:
#   - the wheels the GPU machine lacks, for CPython 3.12 / manylinux x86_64 (xformers pinned to a
#     release built for torch 2.11);
#   - a pure-python DeepSpeed wheel (its ops compile just-in-time where used);
#   - a gsplat wheel compiled here for Python 3.12 / torch 2.11.0+cu130 / sm_90, in a throwaway
#     Python 3.12 venv (pyenv), so no GPU minute goes to compiling the peer.
# Everything is cached in $FAST3D_GPU_CACHE (default ~/.cache/fast3d-gpu): a second run copies the
# cached wheels and builds nothing. The gsplat build's duration is written to
# $FAST3D_GPU_CACHE/gsplat-build.txt and copied into .whl/ beside the wheel.
# The gsplat build is resumable: its source archive is unpacked once into
# $FAST3D_GPU_CACHE/gsplat-$GSPLAT_VERSION-src and built there (`setup.py bdist_wheel`), so ninja's
# build folder (build/temp.*) persists; rerun after a kill and only the objects not yet compiled
# are compiled. Each attempt's span is appended to gsplat-build-spans.txt and the build time
# reported is their sum. A gsplat wheel without the compiled extension (gsplat/csrc*.so; the
# registry's wheel compiles on first use) is deleted from the cache and from .whl/ on every run,
# so it is never carried to a GPU machine.
#
#   profiling/gpu_prepare.sh                 # from anywhere; the build runs at nice 19, MAX_JOBS=1
#   profiling/gpu_prepare.sh --dry-run       # what it would fetch and build, what is cached; no network
#
# Environment: GSPLAT_VERSION (1.5.3), TORCH_VERSION (2.11.0), GSPLAT_ARCH (9.0), CUDA_HOME
# (/usr/local/cuda-13.0), PY312 (a Python 3.12 interpreter; default: pyenv's newest 3.12),
# MAX_JOBS (1: leave the other cores to the machine's other users).
set -euo pipefail

# All of it in one function, called on the last line: bash reads the whole body before running
# it, so editing this file during an hours-long build cannot change what the running copy does.
main() {
  cd "$(dirname "$0")/.."
  dest=.whl
  cache=${FAST3D_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fast3d-gpu}
  GSPLAT_VERSION=${GSPLAT_VERSION:-1.5.3}
  TORCH_VERSION=${TORCH_VERSION:-2.11.0}
  GSPLAT_ARCH=${GSPLAT_ARCH:-9.0}
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
  MAX_JOBS=${MAX_JOBS:-1}
  LIMIT_MB=60
  pkgs=(diffusers importlib-metadata lpips xformers==0.0.35 hjson pydantic pydantic-core
        annotated-types typing-inspection typing-extensions py-cpuinfo msgpack jaxtyping wadler-lindig)
  # has_ext WHEEL: whether a gsplat wheel holds its compiled extension (gsplat/csrc*.so).
  # (grep reads the whole listing: with -q it could stop early and fail the pipe under pipefail)
  has_ext() { python3 -m zipfile -l "$1" | grep 'gsplat/csrc[^/]*\.so' > /dev/null; }
  if [ "${1-}" = --dry-run ]; then
    echo "registry wheels (cp312, manylinux x86_64): ${pkgs[*]}"
    echo "deepspeed: a pure-python wheel from its source archive"
    echo "gsplat $GSPLAT_VERSION: built from source for torch $TORCH_VERSION, TORCH_CUDA_ARCH_LIST=$GSPLAT_ARCH, nvcc $CUDA_HOME"
    echo "cache: $cache"
    ls "$cache"/wheels/*.whl 2>/dev/null | sed 's/^/  cached: /' || true
    cat "$cache/gsplat-build.txt" 2>/dev/null || echo "  no gsplat wheel cached yet: the build takes hours on 2 busy cores at nice 19"
    src=$cache/gsplat-$GSPLAT_VERSION-src
    if [ -d "$src/build" ]; then
      echo "  gsplat build folder $src/build: $(find "$src/build" -name '*.o' | wc -l) objects compiled (a run resumes from them)"
    fi
    for w in "$dest"/gsplat*.whl "$cache"/wheels/gsplat*.whl; do
      if [ -e "$w" ] && ! has_ext "$w"; then echo "  stale: $w holds no compiled extension; a run deletes it"; fi
    done
    echo "$dest: $(ls "$dest"/*.whl 2>/dev/null | wc -l) wheels, $(du -sm "$dest" 2>/dev/null | cut -f1) MB (limit $LIMIT_MB MB)"
    exit 0
  fi
  mkdir -p "$dest" "$cache/wheels"
  for w in "$dest"/gsplat*.whl "$cache"/wheels/gsplat*.whl; do
    if [ -e "$w" ] && ! has_ext "$w"; then
      echo "gpu_prepare.sh: deleting $w: it holds no compiled extension (gsplat would compile on first use)"
      rm -f "$w"
      if [ "$(dirname "$w")" = "$dest" ]; then rm -f "$dest/gsplat-build.txt"; fi
    fi
  done
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

  # 1. Wheels from the registry, for the GPU machine's interpreter and platform. xformers 0.0.35 is
  #    the release built against torch 2.10-2.11 (abi3, 3 MB); pydantic and pydantic-core come as
  #    the pair pydantic pins; py-cpuinfo, msgpack and hjson are DeepSpeed's imports, jaxtyping and
  #    wadler-lindig gsplat's, typing-extensions the version pydantic needs: all small, and the GPU
  #    image's list (GPU.md) does not name them.
  plat=(--python-version 3.12 --implementation cp --only-binary=:all:
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64 --platform any)
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$cache/wheels" "${pkgs[@]}"

  # 2. DeepSpeed ships only a source archive: a pure-python wheel of it, built once.
  if ! ls "$cache"/wheels/deepspeed-*.whl >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" deepspeed \
      || DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$tmp" deepspeed
    cp "$tmp"/deepspeed-*.whl "$cache/wheels/"
    rm -rf "$tmp"
  fi

  # 3. gsplat, compiled for the GPU machine in a throwaway Python 3.12 venv with its torch.
  #    The registry's gsplat wheel is pure python and compiles its CUDA code on first use, so the
  #    source archive is built (--no-binary), and the wheel must hold the compiled extension.
  gs_whl() { ls "$cache"/wheels/gsplat-"$GSPLAT_VERSION"-cp312-*.whl 2>/dev/null | head -1; }
  if [ -z "$(gs_whl)" ]; then
    PY312=${PY312:-$(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12.*/bin/python3 2>/dev/null | sort -V | tail -1)}
    if [ -z "$PY312" ] || ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "gpu_prepare.sh: no Python 3.12 found (set PY312=/path/to/python3.12)" >&2; exit 2
    fi
    [ -x "$CUDA_HOME/bin/nvcc" ] || { echo "gpu_prepare.sh: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2; exit 2; }
    venv=$cache/venv-py312-torch$TORCH_VERSION
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
      rm -rf "$venv"
      "$PY312" -m venv "$venv"
      "$venv/bin/python" -m pip install -q --upgrade pip
      # torch's CUDA 13.0 build (the registry's default for 2.11) brings the CUDA libraries its
      # import loads; the build uses the toolkit's nvcc against torch's headers.
      "$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION" numpy ninja "setuptools<82" wheel
    fi
    "$venv/bin/python" -c "import torch; print('build venv: torch', torch.__version__, 'cuda', torch.version.cuda)"
    # The source archive, unpacked once into a fixed folder: its build/ survives a killed build.
    src=$cache/gsplat-$GSPLAT_VERSION-src
    if [ ! -f "$src/setup.py" ]; then
      sdist=$(mktemp -d)
      # (pip reads the archive's metadata by running its setup.py, which imports torch: no isolation)
      "$venv/bin/python" -m pip download -q --no-deps --no-build-isolation --no-binary gsplat -d "$sdist" "gsplat==$GSPLAT_VERSION"
      rm -rf "$src.part" && mkdir -p "$src.part"   # unpacked aside, then moved: never half a tree
      tar -xzf "$sdist"/gsplat-"$GSPLAT_VERSION".tar.gz -C "$src.part" --strip-components=1
      rm -rf "$src" && mv "$src.part" "$src"
      rm -rf "$sdist"
    fi
    echo "gsplat build in $src: $(find "$src" -path '*/build/*' -name '*.o' | wc -l) objects already compiled (log: $cache/gsplat-build.log)"
    out=$(mktemp -d)
    # One line per attempt in gsplat-build-spans.txt: start, end (epoch s), how it ended (exit-N or
    # interrupted), objects compiled by then; written also on SIGINT/TERM/HUP (not after a SIGKILL).
    span() { echo "$start $(date +%s) $1 $(find "$src" -path '*/build/*' -name '*.o' | wc -l)" >> "$cache/gsplat-build-spans.txt"; }
    start=$(date +%s)
    trap 'span interrupted; exit 130' INT TERM HUP
    rc=0
    ( cd "$src" && CUDA_HOME=$CUDA_HOME PATH=$CUDA_HOME/bin:$PATH TORCH_CUDA_ARCH_LIST=$GSPLAT_ARCH MAX_JOBS=$MAX_JOBS \
        nice -n 19 "$venv/bin/python" setup.py bdist_wheel -d "$out" ) >> "$cache/gsplat-build.log" 2>&1 || rc=$?
    trap - INT TERM HUP
    span "exit-$rc"
    if [ "$rc" -ne 0 ]; then
      tail -40 "$cache/gsplat-build.log"
      echo "gpu_prepare.sh: gsplat build failed (log: $cache/gsplat-build.log); rerun to resume it" >&2; exit 1
    fi
    w=$(ls "$out"/gsplat-*.whl | head -1)
    has_ext "$w" || { echo "gpu_prepare.sh: the gsplat wheel holds no compiled extension (gsplat/csrc*.so)" >&2; exit 1; }
    cp "$w" "$cache/wheels/"
    rm -rf "$out"
    {
      echo "gsplat $GSPLAT_VERSION wheel: python 3.12, torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'), TORCH_CUDA_ARCH_LIST=$GSPLAT_ARCH"
      echo "built on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), MAX_JOBS=$MAX_JOBS, nice 19, in $(wc -l < "$cache/gsplat-build-spans.txt") attempt(s):"
      while read -r a b c n; do
        echo "  $(date -u -d "@$a" +%Y-%m-%dT%H:%M:%SZ) to $(date -u -d "@$b" +%H:%M:%SZ): $((b - a)) s, $c, $n objects compiled"
      done < "$cache/gsplat-build-spans.txt"
      echo "build time: $(awk '{t += $2 - $1} END {print t}' "$cache/gsplat-build-spans.txt") s"
    } > "$cache/gsplat-build.txt"
  fi

  # 4. Fill .whl from the cache and check the size limit.
  rm -f "$dest"/*.whl
  for w in "$cache"/wheels/*.whl; do cp "$w" "$dest/"; done
  cp "$cache/gsplat-build.txt" "$dest/" 2>/dev/null || true
  cat "$dest/gsplat-build.txt" 2>/dev/null || true
  ls -la "$dest"
  size_mb=$(du -sm "$dest" | cut -f1)
  echo "$dest: $size_mb MB (limit $LIMIT_MB MB)"
  if [ "$size_mb" -gt "$LIMIT_MB" ]; then
    echo "gpu_prepare.sh: $dest is $size_mb MB, over the $LIMIT_MB MB the GPU machine takes" >&2; exit 1
  fi
}

main "$@"
exit
