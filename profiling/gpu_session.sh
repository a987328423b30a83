#!/usr/bin/env bash
# One GPU session in one command (see the project's GPU notes): build for the local GPU, GPU
# tests, compute-sanitizer memcheck, the device's peaks, the benchmark. Logs and result rows go
# under $OUT (default ./gpu-out); the table of results is printed last. Where the machine has no
# package registry, wheels carried in ./.whl are installed first.
#
#   profiling/gpu_session.sh [fast3d bench arguments]      e.g. rasterization composite --workload lgm
#
# STAGES picks what runs after the build (default "tests memcheck bench"). A lent machine's command
# is limited to 10 minutes, so a session may split its work over calls, e.g.
#   STAGES="tests memcheck" profiling/gpu_session.sh
#   STAGES=bench profiling/gpu_session.sh rasterization composite triplane_sample render_triplane
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES-tests memcheck bench}   # set but empty: the build alone
for s in $STAGES; do
  case $s in tests|memcheck|bench) ;; *) echo "gpu_session.sh: unknown stage '$s' in STAGES; valid: tests memcheck bench" >&2; exit 2;; esac
done
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_session.sh: no NVIDIA GPU here (nvidia-smi -L failed); run it on a GPU machine" >&2
  exit 2
fi
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

# Build only for this GPU's architecture (e.g. 90): the full arch list is CI's job.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
FAST3D_CUDA=1 FAST3D_CUDA_ARCHS=$arch MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -m fast3d.cli info | tee "$OUT/info.txt"

stage() { [[ " $STAGES " == *" $1 "* ]]; }

status=0   # the first failing stage's exit code, returned at the end
if stage tests; then
  python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
  rc=${PIPESTATUS[0]}; [ "$status" -ne 0 ] || status=$rc
fi
if stage memcheck; then
  # memcheck over every op's GPU tests (slow under the sanitizer: bounded by timeout).
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 -m pytest -m gpu -q -p no:cacheprovider -x -k "not compile" \
      > "$OUT/memcheck.log" 2>&1
  rc=$?; [ "$status" -ne 0 ] || status=$rc
  echo "memcheck exit code: $rc (124: stopped at the time limit; log: memcheck.log)" | tee -a "$OUT/gpu-tests.log"
fi
if stage bench; then
  python3 -m fast3d.cli bench "$@" --out "$OUT/results" 2>&1 | tee "$OUT/bench.log"
  rc=${PIPESTATUS[0]}; [ "$status" -ne 0 ] || status=$rc
  python3 -m fast3d.cli report --results "$OUT/results" > /dev/null
  tail -40 "$OUT/bench.log"
fi
exit "$status"
