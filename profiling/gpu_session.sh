#!/usr/bin/env bash
# One GPU validation session (see profiling/README.md), sized for a lent machine's 10-minute
# commands as two commands of under 6 minutes each:
#
#   STAGES="tests memcheck" profiling/gpu_session.sh      # build, gpu tests, compute-sanitizer memcheck
#   STAGES=bench profiling/gpu_session.sh [gpu_bench.py arguments]   # peaks + headline benchmarks
#
# Every command first installs the wheels carried in ./.whl (profiling/gpu_prepare.sh made them:
# diffusers, deepspeed, lpips, xformers, a prebuilt gsplat, ...) into /tmp/site, and builds
# fast3d for this GPU's architecture only (skipped when the build in place is for this
# architecture and newer than every native source). The whole command keeps within SESSION_S
# seconds (default 340, under 6 minutes): each stage runs under its own cap (T_TESTS, T_MEMCHECK,
# T_BENCH) or what is left of SESSION_S, keeping MEMCHECK_MIN seconds for memcheck after the
# tests when both run; the sizing is in profiling/README.md.
#
# A gsplat wheel in ./.whl without its compiled extension is refused (not installed; a "gsplat skip"
# row in the table), so gsplat never compiles its CUDA code inside the bench stage's cap.
#
# Under $OUT (default ./gpu-out), at most 8 files, 2 folders deep: session.log (GPU, build, fast3d
# info), summary.txt (the compact table printed last), tests.log, memcheck.log, bench.log and the
# result rows results/<device-slug>/<op>.jsonl. STAGES unset runs all three stages; STAGES set but
# empty builds only. Exit code: the first failing stage's (124: it hit its time limit); 2 without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES-tests memcheck bench}
for s in $STAGES; do
  case $s in tests|memcheck|bench) ;; *) echo "gpu_session.sh: unknown stage '$s' in STAGES; valid: tests memcheck bench" >&2; exit 2;; esac
done
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_session.sh: no NVIDIA GPU here (nvidia-smi -L failed); run it on a GPU machine" >&2
  exit 2
fi
SESSION_S=${SESSION_S:-340}
T_TESTS=${T_TESTS:-150}
T_MEMCHECK=${T_MEMCHECK:-120}
T_BENCH=${T_BENCH:-300}
MEMCHECK_MIN=${MEMCHECK_MIN:-80}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
LOG=$OUT/session.log
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
t_start=$(date +%s)

# One line of the stage table: name, exit code, seconds, what it found.
row() { printf '%-9s rc=%-4s %5ss  %s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"; }

# The carried wheels, less a gsplat wheel without its compiled extension (gsplat/csrc*.so): that
# one would compile gsplat's CUDA code on first use, minutes inside the bench cap, so it is refused
# and the gsplat baselines are skipped (the bench table then reports gsplat as not importable).
wheels=()
for w in .whl/*.whl; do
  [ -e "$w" ] || continue
  case $(basename "$w") in
    gsplat-*)
      if python3 -m zipfile -l "$w" | grep 'gsplat/csrc[^/]*\.so' > /dev/null; then
        row gsplat - 0 "$(basename "$w"): compiled extension; $(grep -h 'build time' .whl/gsplat-build.txt 2>/dev/null)"
      else
        row gsplat skip 0 "refused $(basename "$w"): no compiled extension (would JIT-compile); gsplat baselines skipped"
        continue
      fi ;;
  esac
  wheels+=("$w")
done
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${wheels[@]}" >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  cat .whl/gsplat-build.txt >> "$LOG" 2>/dev/null
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv >> "$LOG"
cat "$LOG"

# Build only for this GPU's architecture (e.g. 90): the full arch list is CI's job.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
t0=$(date +%s)
so=$(ls fast3d/_C*.so 2>/dev/null | head -1)
if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -1)" ] \
   && python3 -c "import json, sys; b = json.load(open('fast3d/_build_info.json')); sys.exit(not (b['cuda'] and '$arch' in b['cuda_archs']))" 2>/dev/null; then
  row build 0 0 "up to date for sm_$arch ($so)"
else
  FAST3D_CUDA=1 FAST3D_CUDA_ARCHS=$arch MAX_JOBS=$(nproc) python3 -m pip install -q --no-build-isolation --no-deps -e . \
      >> "$LOG" 2>&1
  rc=$?
  row build "$rc" $(( $(date +%s) - t0 )) "sm_$arch"
  if [ "$rc" -ne 0 ]; then tail -50 "$LOG"; cat "$SUMMARY"; exit "$rc"; fi
fi
python3 -m fast3d.cli info >> "$LOG" 2>&1

stage() { [[ " $STAGES " == *" $1 "* ]]; }
status=0   # the first failing stage's exit code, returned at the end
keep() { [ "$status" -ne 0 ] || status=$1; }
# limit CAP RESERVE: a stage's seconds, its cap or what SESSION_S leaves after RESERVE, whichever is less
limit() { local l=$(( t_start + SESSION_S - $(date +%s) - $2 )); echo $(( l < 1 ? 1 : (l < $1 ? l : $1) )); }

if stage tests; then
  t0=$(date +%s)
  reserve=0; stage memcheck && reserve=$MEMCHECK_MIN
  timeout "$(limit "$T_TESTS" "$reserve")" python3 -m pytest -m gpu -q -p no:cacheprovider \
      > "$OUT/tests.log" 2>&1
  rc=$?; keep "$rc"
  row tests "$rc" $(( $(date +%s) - t0 )) "$(grep -E '(passed|failed|error|skipped)' "$OUT/tests.log" | tail -1)"
fi
if stage memcheck; then
  # A small case of every GPU kernel (CUDA and Triton), forward and backward, under memcheck.
  t0=$(date +%s)
  timeout "$(limit "$T_MEMCHECK" 0)" compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
      python3 profiling/gpu_smoke.py > "$OUT/memcheck.log" 2>&1
  rc=$?; keep "$rc"
  row memcheck "$rc" $(( $(date +%s) - t0 )) \
      "$(grep -hE 'gpu_smoke(\.py)?:' "$OUT/memcheck.log" | tail -1); $(grep -h 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1)"
fi
if stage bench; then
  # The device's peaks, then the headline workloads against gsplat, SDPA and xformers.
  t0=$(date +%s)
  echo "bench (gpu_bench.py):" >> "$SUMMARY"
  timeout "$(limit "$T_BENCH" 0)" python3 profiling/gpu_bench.py --out "$OUT/results" --summary "$SUMMARY" "$@" \
      > "$OUT/bench.log" 2>&1
  rc=$?; keep "$rc"
  row bench "$rc" $(( $(date +%s) - t0 )) "$(grep -h 'peak bandwidth' "$OUT/bench.log" | head -1 | sed 's/^ *//')"
fi
row total "$status" $(( $(date +%s) - t_start )) "stages: ${STAGES:-build only}"
echo
cat "$SUMMARY"
exit "$status"
