#!/usr/bin/env bash
# One prepared check for a GPU machine without network (e.g. one H200), in under 8 minutes:
#   0. on an sm_90a build (ARCH has 9.0a), compiles and runs the wgmma layout probe (csrc/tests/wgmma_probe.cu) in
#      the background during the build, at most 60 s; its report goes into the log after the build (a diagnostic:
#      its exit status does not change this script's),
#   1. builds contrastbound._C with its CUDA kernels against the torch installed there, and checks its link (no
#      copy of libstdc++ in it; error messages keep their numbers: a few CPU tests),
#   2. runs the CUDA tests (marked `cuda`: tests/test_cuda.py and the device="cuda" cases of the other files),
#   3. runs the GPU benchmark (benchmarks/bench_gpu.py),
# and writes gpu_check.log, build.log, pytest_cuda.tgz (pytest_cuda_{default,flash_1pass,wgmma}.xml), bench_gpu.csv
# (default kernels, naive, peers), bench_gpu_opt_in.csv (the opt-in kernels against the default, one process per
# family), bench_gpu_opt_in_kernels.csv (each variant's GPU kernels, profiled at K = 2^18), bench_gpu_wide.csv
# (d = 512, then the negative_mask rows at d = 256) and gpu_summary.txt (issue 4's targets per variant,
# benchmarks/gpu_summary.py) into OUTDIR: 8 files, the most the device tool brings back.
#
#   scripts/gpu_check.sh OUTDIR [--quick]
#
# Environment: PYTHON (interpreter with a CUDA torch; default: the repo's .venv if its torch has CUDA, else
# python3 if it has a torch, else the .venv), ARCH (TORCH_CUDA_ARCH_LIST, default: the GPU's compute capability, 9.0a on an H100/H200 so that the
# sm_90a wgmma kernels are built), MAX_JOBS (default 16), BUDGET_S (default 450, at most 570: the device tool's
# command limit is 600 s; the run ends within ~10 s of it, the summary last),
# PROFILE_S (seconds for scripts/gpu_profile.sh, an Nsight Compute profile of the kernels the library picks,
# after the build, into the log; default 0: none), TEST_S (seconds for the tests, default 240), BENCH_S (seconds
# the tests leave to the benchmark, default 200; 0: no benchmark, e.g. a run that only tests), TIMING_S (seconds
# for the wgmma kernels' phase timing after the benchmark, benchmarks/wg_timing.py on a diagnostic build in
# /tmp/cb_timing, ~60 s of it the build; default 0: none), TESTS (pytest selection, default tests),
# BENCH_ARGS (extra arguments of bench_gpu.py). Wheels of the peer libraries (inf_cl, cut_cross_entropy) found
# in .whl/ are installed into a temporary folder first (the GPU machine has no network), and so is ninja's (without
# ninja torch compiles the sources one after another and ignores MAX_JOBS). Fetch them beforehand on a machine with
# network (the peers are pure-Python wheels; Triton comes with the GPU machine's torch):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl inf-cl==1.2.1 cut-cross-entropy==25.1.1 ninja 'setuptools>=77'
# (setuptools: installed only where the machine's is older than 77, which pyproject.toml's licence field needs; the
# build stops there otherwise.) Give the device tool's run a timeout of BUDGET_S + 60 s or more.
# Without a GPU it logs "NO GPU" and exits 0 after the environment report (so it can be smoke-tested anywhere).
# Exit status: 0 when everything that ran passed; 1 build failed; 2 tests failed; 3 benchmark failed.
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [--quick]" >&2
  exit 64
fi
OUT=$1
QUICK=${2:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# A reused OUTDIR: no file of an earlier run may pass for this one's (the summary reads whatever CSVs are there).
rm -f "$OUT"/bench_gpu*.csv "$OUT"/gpu_summary.txt "$OUT"/pytest_cuda_*.xml "$OUT"/pytest_cuda.tgz "$OUT"/build.log
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
# On exit, close the pipe to tee and give it a moment, so that the log's last lines are written.
trap 'exec >&- 2>&-; sleep 1' EXIT
cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
BENCH_S=${BENCH_S:-200}
TIMING_S=${TIMING_S:-0}
[ "$BUDGET_S" -gt 570 ] && { echo "BUDGET_S=$BUDGET_S capped at 570"; BUDGET_S=570; }
# Python's output as it comes (a killed run keeps what it printed; tables are printed without flush)
export PYTHONUNBUFFERED=1
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
step() { echo; echo "=== [$(($(date +%s) - START)) s] $*"; }

# The interpreter: PYTHON, else the first of the repo's .venv with a CUDA torch, python3 with a torch, the .venv
# with any torch (a CPU one: the "NO GPU" smoke test below), python3.
has_torch() { [ -x "$(command -v "$1")" ] && "$1" -c "import sys, torch; sys.exit(0 if $2 else 1)" 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif has_torch .venv/bin/python torch.version.cuda; then
  PY=.venv/bin/python
elif has_torch python3 True; then
  PY=python3
elif has_torch .venv/bin/python True; then
  PY=.venv/bin/python
else
  PY=python3
fi

# An absolute path where it names a file (.venv/bin/python): the timing step runs it from a copy of the tree.
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac

step "environment"
echo "repo: $(pwd)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')  python: $PY"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch CUDA", torch.version.cuda, "| cuda available", torch.cuda.is_available())' || { echo "no usable torch"; exit 1; }
command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo
  echo "NO GPU: torch.cuda.is_available() is False here; nothing built, tested or measured."
  "$PY" benchmarks/bench_gpu.py --csv "$OUT/bench_gpu.csv" || true
  exit 0
fi

ST=$("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || echo none)
echo "setuptools: $ST"
if ls .whl/*.whl >/dev/null 2>&1; then
  step "peer wheels from .whl/"
  WHEELS=()
  for w in .whl/*.whl; do
    case "$(basename "$w")" in
      setuptools-*) [ "${ST%%.*}" != none ] && [ "${ST%%.*}" -ge 77 ] 2>/dev/null && continue
                    echo "setuptools $ST < 77 (pyproject.toml's licence field needs 77): installing $(basename "$w")";;
    esac
    WHEELS+=("$w")
  done
  [ ${#WHEELS[@]} -gt 0 ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cb_site "${WHEELS[@]}" && export PYTHONPATH=/tmp/cb_site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/cb_site/bin:$PATH \
    || echo "peer wheels not installed"
fi
"$PY" -c 'from torch.utils.cpp_extension import is_ninja_available as n; print("ninja available:", n())' || true

# torch guesses CUDA_HOME from the nvcc on the PATH (its parent folder); where that nvcc is a wrapper script outside
# the toolkit (e.g. /usr/local/bin/nvcc), the glue's host compile then misses cuda_runtime_api.h. nvcc itself says
# where its toolkit is (TOP in a dry run).
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  TOP=$(cd /tmp && echo > cb_probe.cu && nvcc -dryrun -c cb_probe.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  [ -n "$TOP" ] && [ -f "$TOP/include/cuda_runtime_api.h" ] && export CUDA_HOME=$(cd "$TOP" && pwd)
  echo "CUDA_HOME=${CUDA_HOME:-unset} (from nvcc)"
fi

ARCH=${ARCH:-$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}" + ("a" if (m, n) == (9, 0) else ""))' 2>/dev/null || echo 9.0a)}
BUILD_S=$(( $(left) - 120 ))
[ "$BUILD_S" -gt 260 ] && BUILD_S=260
[ "$BUILD_S" -lt 60 ] && BUILD_S=60
# The wgmma probe: the sm_90a kernels' descriptors and register fragments on known matrices, which names the
# product and the index that moved if the hardware reads a layout otherwise than the emulation. Compiled and run
# in the background while the extension builds (binary and output in /tmp: OUTDIR holds 8 files at most).
PROBE_PID=
if [[ "$ARCH" == *9.0a* ]]; then
  NVCC=nvcc
  [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && NVCC=$CUDA_HOME/bin/nvcc
  rm -f /tmp/cb_wgmma_probe /tmp/cb_wgmma_probe.log
  echo "wgmma probe: compiled with $NVCC and run in the background (at most 60 s; report after the build)"
  (
    timeout -k 5 60 bash -c 'nice "$0" -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a csrc/tests/wgmma_probe.cu -o /tmp/cb_wgmma_probe \
      || { echo "wgmma probe: COMPILE FAILED"; exit 3; }; /tmp/cb_wgmma_probe' "$NVCC" >/tmp/cb_wgmma_probe.log 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "wgmma probe: TIMED OUT after 60 s (compile and run)" >>/tmp/cb_wgmma_probe.log
    echo "wgmma probe exit status: $rc (0: layouts as documented, 1: MISMATCH, 2: could not run, 3: not compiled)" \
      >>/tmp/cb_wgmma_probe.log
  ) &
  PROBE_PID=$!
fi
probe_report() {  # waits for the probe (if any) and prints its output
  [ -n "$PROBE_PID" ] || return 0
  wait "$PROBE_PID"
  step "wgmma probe (csrc/tests/wgmma_probe.cu, sm_90a)"
  cat /tmp/cb_wgmma_probe.log
  PROBE_PID=
}

step "build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=${MAX_JOBS:-16}, at most $BUILD_S s)"
BUILD_RC=0
FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST="$ARCH" \
  timeout "$BUILD_S" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || BUILD_RC=$?
probe_report
if [ "$BUILD_RC" -ne 0 ]; then
  tail -60 "$OUT/build.log"
  echo "BUILD FAILED (full log: $OUT/build.log)"
  exit 1
fi
grep -E "contrastbound:|warning" "$OUT/build.log" | head -40
"$PY" -c 'import contrastbound, json; print(json.dumps(contrastbound.backend_info(), indent=1))'
if ! "$PY" -c 'import sys, contrastbound; sys.exit(contrastbound.backend_info()["cuda"] != "kernel")'; then
  echo "BUILD FAILED: the CUDA kernels did not load (backend_info above)"
  exit 1
fi
step "the module's link (CPU tests)"
# The module's link (a few seconds, CPU only, not marked cuda): on this machine's first run (2026-12-04) the compiler
# linked a copy of libstdc++ into it and every C++ error message that formats a number crashed the process;
# setup.py links torch's libstdc++ since. This names any libstdc++ symbol the module still defines, and checks that
# the ops' error messages keep their numbers (a crash here is that bug). Its result counts with the tests'.
LINK_RC=0
timeout 60 "$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_packaging.py tests/test_errors.py \
  -k "libstdcxx or registered_op_checks or indices" || LINK_RC=$?
[ "$LINK_RC" -eq 5 ] && LINK_RC=0
[ "$LINK_RC" -ne 0 ] && echo "LINK CHECK FAILED (exit status $LINK_RC): see above"

# Optional (PROFILE_S > 0 seconds): scripts/gpu_profile.sh, Nsight Compute on the kernels the library picks (the
# extension just built), its summary into this log and its files into /tmp/cb_profile (OUTDIR keeps its 8 files).
# ncu could not read the hardware counters on some of this project's GPU machines: a diagnostic, not a check.
if [ "${PROFILE_S:-0}" -gt 0 ]; then
  step "profile (scripts/gpu_profile.sh, at most $PROFILE_S s)"
  PATH=${CUDA_HOME:+$CUDA_HOME/bin:}$PATH PYTHON=$PY timeout -k 10 "$PROFILE_S" \
    bash scripts/gpu_profile.sh /tmp/cb_profile || echo "gpu_profile.sh: exit status $?"
fi

step "CUDA tests"
TEST_RC=$LINK_RC
if "$PY" -c 'import pytest' 2>/dev/null; then
  # The benchmark phase (the main run, which measures K = 2^14, 2^18, 2^22 first, the opt-in families and the
  # wide rows) keeps BENCH_S (200 s by default).
  T=${TEST_S:-240}
  [ "$T" -gt $(( $(left) - BENCH_S - TIMING_S )) ] && T=$(( $(left) - BENCH_S - TIMING_S ))
  [ "$T" -lt 30 ] && T=30
  PER_TEST=""
  "$PY" -c 'import pytest_timeout' 2>/dev/null && PER_TEST="--timeout=120"
  # Test modules that need a package this machine may lack (no network to install it) are left out, by name
  # (test_info_nce.py imports hypothesis optionally: only its property test needs it).
  IGNORE=()
  "$PY" -c 'import hypothesis' 2>/dev/null \
    || { echo "hypothesis missing: not collecting tests/test_sandwich.py, tests/test_clip_kernel.py"; \
         IGNORE+=(--ignore=tests/test_sandwich.py --ignore=tests/test_clip_kernel.py); }
  "$PY" -c 'import mpmath' 2>/dev/null \
    || { echo "mpmath missing: not collecting tests/test_bounds.py, tests/test_reproduce.py"; \
         IGNORE+=(--ignore=tests/test_bounds.py --ignore=tests/test_reproduce.py); }
  # Three processes: the default kernels first (on an H100/H200 with a 9.0a build: wgmma), then the explicit
  # variants (wgmma asked for with =1, and the opt-in one-pass and flash kernels, whose tests have not run on a
  # GPU), whose failure could poison the CUDA context of every later test in the same process. SIGINT on
  # timeout, so that pytest still prints its summary and writes the XML; a test running for 30 s (no CUDA test
  # should: a hung kernel, where Python cannot take the SIGINT while blocked in a CUDA call and the kill leaves no
  # XML) has its stacks dumped (faulthandler_timeout, a per-test timer; a test that hangs with less than 30 s of
  # its group's time left is named by -v alone). The opt-in groups print each test's name (-v); the default group
  # runs on 8 workers where pytest-xdist is installed (on an H200, 2026-12-04, 4 workers ran ~740 cases in the
  # 139 s the group had and were stopped at ~95 %; the machine has 16 cores, and the cases are small).
  # Each worker's torch gets its share of the cores (OMP_NUM_THREADS, unless set): with torch's default, one thread
  # per core in every worker, 8 workers ran up to 128 threads on 16 cores. In run 4 (2026-12-04) the slowest cases,
  # whose CPU side (the CPU kernel, the float64 reference) is large, took 7-13 s each: 205 cases in the group's 77 s
  # (oversubscription is this script's guess at why; not measured).
  XDIST=()
  "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
  NCPU=$(nproc 2>/dev/null || echo 8)
  WORKER_THREADS=$(( NCPU / 8 > 0 ? NCPU / 8 : 1 ))
  run_tests() {  # NAME SECONDS VERBOSITY -k EXPR [FILES] [EXTRA...]
    local rc=0 name=$1 secs=$2 verb=$3 expr=$4 files=${5:-tests}
    shift 5 2>/dev/null || shift $#
    local threads=${OMP_NUM_THREADS:-}
    [ $# -gt 0 ] && [ "$1" = "-n" ] && threads=${OMP_NUM_THREADS:-$WORKER_THREADS}  # (an xdist group)
    env ${threads:+OMP_NUM_THREADS=$threads} timeout -s INT -k 10 "$secs" \
      "$PY" -m pytest ${TESTS:-$files} ${IGNORE[@]+"${IGNORE[@]}"} "$verb" -m cuda \
      -k "$expr" --continue-on-collection-errors -p no:cacheprovider $PER_TEST -rfE --tb=short --durations=5 \
      -o faulthandler_timeout=30 --junitxml="$OUT/pytest_cuda_$name.xml" "$@" || rc=$?
    [ "$rc" -eq 124 ] && echo "TESTS ($name) TIMED OUT after $secs s"
    [ "$rc" -eq 5 ] && rc=0  # none selected (e.g. wgmma off compute capability 9.0)
    [ "$rc" -ne 0 ] && TEST_RC=$rc
    return 0
  }
  # Each group's time from what is left of T (time a group does not use goes to the next): the default group
  # 60 %, then wgmma (~76 cases: the Hopper kernels, the default on an H200, where they passed on 2026-12-04)
  # 40 % of the rest, the one-pass / flash group (~120) the remainder, less the kill graces; a group without time
  # says so. Below 150 s only the default kernels' group runs.
  TEST_END=$(( $(date +%s) + T ))
  until_end() { echo $(( TEST_END - $(date +%s) )); }
  DEFAULT_K="not mma_1pass and not flash and not wgmma"
  if [ "$T" -ge 150 ]; then
    run_tests default $(( (T - 30) * 60 / 100 )) -q "$DEFAULT_K" tests ${XDIST[@]+"${XDIST[@]}"}
    R=$(until_end)
    if [ "$R" -ge 40 ]; then run_tests wgmma $(( (R - 20) * 40 / 100 )) -v "wgmma" tests/test_cuda.py
    else echo "TESTS (wgmma) SKIPPED: $R s left"; fi
    R=$(until_end)
    if [ "$R" -ge 30 ]; then run_tests flash_1pass $(( R - 10 )) -v "mma_1pass or flash" tests/test_cuda.py
    else echo "TESTS (flash_1pass) SKIPPED: $R s left"; fi
  else
    echo "only $T s for the tests: the default kernels' group only (the opt-in kernels are still checked by the benchmark)"
    run_tests default $(( T - 10 )) -q "$DEFAULT_K" tests ${XDIST[@]+"${XDIST[@]}"}
  fi
  # One file for the three reports (the device tool brings back at most 8 files)
  XMLS=$(cd "$OUT" && ls pytest_cuda_*.xml 2>/dev/null)
  [ -n "$XMLS" ] && (cd "$OUT" && tar czf pytest_cuda.tgz $XMLS && rm -f $XMLS)
else
  echo "pytest is not installed here: running no tests"
  TEST_RC=5
fi

step "GPU benchmark"
BENCH_RC=0
B=$(( $(left) - 20 - TIMING_S ))
if [ "$BENCH_S" -eq 0 ]; then
  echo "BENCH_S=0: no benchmark"
elif [ "$B" -lt 30 ]; then
  echo "no time left for the benchmark"
  BENCH_RC=124
else
  # Processes of their own (rows are written as they are measured): the default kernels, naive, peers and the
  # safe variants; then the opt-in kernels (one-pass forward, flash layout, wgmma), one process per family, each
  # variant first checked against the default kernels' loss and gradients ("WRONG RESULT" instead of a time when
  # they disagree), so that one poisoning the CUDA context can cost neither the main table nor another family;
  # then the wide rows.
  B1=$(( B * 6 / 10 ))
  timeout -s INT -k 20 "$B1" "$PY" benchmarks/bench_gpu.py $QUICK ${BENCH_ARGS:-} \
    --budget $((B1 - 40 > 20 ? B1 - 40 : 20)) --csv "$OUT/bench_gpu.csv" || BENCH_RC=$?
  # The opt-in kernels come first (they decide the defaults); 45 s are kept for the wide-row run below only
  # where at least 120 s are left.
  WIDE=0
  [ "$(left)" -ge 120 ] && WIDE=45
  MASK=0  # the negative_mask rows, after the wide ones, where at least 170 s are left
  [ "$(left)" -ge 170 ] && MASK=40
  B2=$(( $(left) - 15 - WIDE - MASK ))
  if [ "$B2" -ge 30 ]; then
    # One process per opt-in family, all appending to one CSV: a kernel that poisons its process's CUDA context
    # costs its own family only. Each takes its share of what is left of B2 (time a family does not use goes to
    # the next). --kernels 18: first a per-kernel profile (one step per variant at K = 2^18, a few seconds):
    # bench_gpu_opt_in_kernels.csv says which kernel holds each variant back. (No wgmma family: on a 9.0a build
    # the wgmma kernels are the default, the `fused` rows, and elsewhere they cannot run; bench_gpu.py's
    # --variants wgmma still times them with CONTRASTBOUND_TC_WGMMA=1.)
    OPT_END=$(( $(date +%s) + B2 ))
    FAMILIES=(flash 1pass)
    for i in 0 1; do
      F=${FAMILIES[$i]}
      BF=$(( (OPT_END - $(date +%s)) / (2 - i) ))
      if [ "$BF" -lt 30 ]; then echo "no time left for the opt-in family $F"; continue; fi
      echo "--- opt-in family $F ($BF s)"
      timeout -s INT -k 20 "$BF" "$PY" benchmarks/bench_gpu.py $QUICK --opt-in-only --variants "$F" --append \
        --kernels 18 ${BENCH_ARGS:-} --budget $((BF - 30 > 20 ? BF - 30 : 20)) --csv "$OUT/bench_gpu_opt_in.csv" \
        || true
    done
  else
    echo "no time left for the opt-in kernels' benchmark"
  fi
  # Wide rows (d = 512, CLIP ViT-B's width): the sliced mma.sync rows passes (copied in chunks of 256 features,
  # the default there since 2026-12-04; fused_whole: whole rows with two Y stages, the default before;
  # fused_1stage: whole rows, one stage) against naive and the SIMT kernels (fused_simt).
  B3=$(( $(left) - 10 - MASK ))
  if [ "$WIDE" -gt 0 ] && [ "$B3" -ge 30 ]; then
    timeout -s INT -k 10 "$B3" "$PY" benchmarks/bench_gpu.py --d 512 --kmin 16 --kmax 16 --repeats 2 --no-peers \
      --problems shared --budget $((B3 - 25)) --csv "$OUT/bench_gpu_wide.csv" || true
  else
    echo "no time left for the wide-row benchmark"
  fi
  # A shared bank with a (B, K) negative_mask (each anchor's own class of 100 left out), and the same classes as
  # labels (on an H200 the wgmma kernels' masked path, elsewhere the mma.sync kernels' LEFT_OUT instances; neither
  # timed on hardware yet), against the same problem unmasked
  # and naive masked; appended to the wide CSV (the device tool brings back at most 8 files).
  B4=$(( $(left) - 10 ))
  if [ "$MASK" -gt 0 ] && [ "$B4" -ge 30 ]; then
    timeout -s INT -k 10 "$B4" "$PY" benchmarks/bench_gpu.py --kmin 16 --kmax 18 --repeats 2 --no-peers \
      --problems shared,shared_mask,shared_labels --append --budget $((B4 - 25)) --csv "$OUT/bench_gpu_wide.csv" || true
  else
    echo "no time left for the negative_mask benchmark"
  fi
fi

# Optional (TIMING_S > 0 seconds, kept from the benchmark): where the wgmma kernels' cycles go, from a diagnostic
# build (setup.py's CONTRASTBOUND_WG_TIMING=1) in a copy of the tree (/tmp/cb_timing: this run's build stays as it
# is): benchmarks/wg_timing.py's table per problem (shared bank, in-batch, a negative_mask, labels), into the log.
# A diagnostic, not a check: its exit status does not change this script's.
if [ "$TIMING_S" -gt 0 ]; then
  TIMING_END=$(( $(date +%s) + TIMING_S ))
  step "wgmma phase timing (CONTRASTBOUND_WG_TIMING=1 build in /tmp/cb_timing, at most $TIMING_S s)"
  rm -rf /tmp/cb_timing && mkdir -p /tmp/cb_timing
  tar --exclude=./build --exclude=./.venv --exclude=./cmake-build --exclude=./.git --exclude='*.so' -cf - . \
    | tar -xf - -C /tmp/cb_timing
  if (cd /tmp/cb_timing && FORCE_CUDA=1 CONTRASTBOUND_WG_TIMING=1 MAX_JOBS=${MAX_JOBS:-16} \
        TORCH_CUDA_ARCH_LIST="$ARCH" timeout $(( TIMING_S - 20 > 10 ? TIMING_S - 20 : 10 )) \
        "$PY" setup.py build_ext --inplace >/tmp/cb_timing_build.log 2>&1); then
    for P in shared in_batch shared_mask shared_labels; do
      R=$(( TIMING_END - $(date +%s) ))
      [ "$R" -lt 10 ] && { echo "no time left for the $P timing"; break; }
      (cd /tmp/cb_timing && timeout -k 5 "$R" "$PY" benchmarks/wg_timing.py --problem "$P") \
        || echo "wg_timing.py ($P): exit status $?"
    done
  else
    echo "the timing build failed or ran out of time:"
    tail -20 /tmp/cb_timing_build.log
  fi
fi

step "summary"
# Issue 4's targets per kernel variant and the fastest one that passed (benchmarks/gpu_summary.py).
CSVS=()
for f in "$OUT/bench_gpu.csv" "$OUT/bench_gpu_opt_in.csv"; do [ -s "$f" ] && CSVS+=("$f"); done
if [ ${#CSVS[@]} -gt 0 ]; then
  "$PY" benchmarks/gpu_summary.py "${CSVS[@]}" | tee "$OUT/gpu_summary.txt" || true
fi
echo "tests exit status: $TEST_RC   benchmark exit status: $BENCH_RC   total: $(($(date +%s) - START)) s"
echo "files: $(ls "$OUT" | tr '\n' ' ')"
[ "$TEST_RC" -ne 0 ] && exit 2
[ "$BENCH_RC" -ne 0 ] && exit 3
exit 0
