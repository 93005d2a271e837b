#!/usr/bin/env bash
# Builds the C++ core with CMake against the venv's libtorch, runs the C++ tests with ctest, and (where nvcc is
# on the PATH) compiles every CUDA source for sm_75, sm_80 and sm_90a (and as C++17 for compute_90a). Fails if any
# step fails or no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
PREFIX=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B cmake-build "${GEN[@]}" -DCMAKE_PREFIX_PATH="$PREFIX" -Wno-dev >cmake-build.log 2>&1 || { cat cmake-build.log; exit 1; }
grep -E "contrastbound:" cmake-build.log || true
# ptxas reports (as "info", which -Werror does not catch) when it serialises the wgmma instructions of a kernel
# (C7510-C7518, one code per reason, e.g. C7515, C7514 "non wgmma instructions reading accumulator registers ...",
# C7513 "... defining input registers ...": every warpgroup MMA waited for alone, much slower) and when it adds a
# warpgroup.arrive before a wgmma (C7519: e.g. a product whose shape or trip count is known only at run time):
# any of them fails the check.
# (ptxas -v's per-kernel lines go to the log only; scripts/ptxas_report.py summarises them below.)
cmake --build cmake-build -j "${MAX_JOBS:-2}" 2>&1 | tee cmake-build/compile.log | { grep -v "^ptxas info" || true; }
for code in $(grep -oE "\(C751[0-9]\)" cmake-build/compile.log | tr -d '()' | sort -u); do
  echo "FAILED: ptxas note $code (wgmma serialised or fenced by the compiler) in:"
  grep "($code)" cmake-build/compile.log | sed "s/.*function '\(.*\)'.*/\1/" | sort -u | c++filt | sed 's/^/  /'
  FAILED_NOTE=1
done
[ -z "${FAILED_NOTE:-}" ] || exit 1
# Registers and spills of the tensor-core kernels; fails if a flash-layout or wgmma kernel spills.
python scripts/ptxas_report.py cmake-build/compile.log
ctest --test-dir cmake-build --output-on-failure --no-tests=error
if command -v nvcc >/dev/null; then
  # (contrastbound_cuda_cxx17_check: the same sources as C++17, the dialect of torch 2.5-2.11's extension build)
  # (contrastbound_wgmma_probe_check: csrc/tests/wgmma_probe.cu for sm_90a, as scripts/gpu_check.sh builds it)
  # (contrastbound_wg_timing_check: the bfloat16 part with CONTRASTBOUND_WG_TIMING, the diagnostic build)
  ls cmake-build/CMakeFiles/contrastbound_cuda_{compile,cxx17}_check.dir/csrc/cuda/*.o \
    cmake-build/CMakeFiles/contrastbound_wg_timing_check.dir/csrc/cuda/*.o \
    cmake-build/CMakeFiles/contrastbound_wgmma_probe_check.dir/csrc/tests/*.o 2>/dev/null \
    | sed 's/^/nvcc compiled: /' || echo "nvcc found, but there are no CUDA sources to compile"
  # Where the spills sit (loop depth, share of the loop), read from the machine code: a report, never a failure.
  # It needs a cuobjdump (CUDA's toolkit; CI's image has nvcc without one; $CUOBJDUMP names one elsewhere).
  OBJS=(cmake-build/CMakeFiles/contrastbound_cuda_compile_check.dir/csrc/cuda/*.o)
  if [ -e "${OBJS[0]}" ]; then
    python scripts/sass_spills.py "${OBJS[@]}" || echo "(spill placement not reported)"
  fi
fi
