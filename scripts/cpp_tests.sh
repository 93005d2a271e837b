#!/usr/bin/env bash
# Builds the C++ core with CMake against the venv's libtorch, runs the C++ tests with ctest, and (where nvcc is
# on the PATH) compiles every CUDA source for sm_80 and sm_90a. Fails if any step fails or no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
PREFIX=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B cmake-build "${GEN[@]}" -DCMAKE_PREFIX_PATH="$PREFIX" -Wno-dev >cmake-build.log 2>&1 || { cat cmake-build.log; exit 1; }
grep -E "contrastbound:" cmake-build.log || true
# ptxas reports (as "info", which -Werror does not catch) when it serialises the wgmma instructions of a kernel
# (C7515: every warpgroup MMA waited for alone, much slower): that fails the check. Its C7519 notes (a
# warpgroup.arrive added before a wgmma) are counted, not printed.
cmake --build cmake-build -j "${MAX_JOBS:-2}" 2>&1 | tee cmake-build/compile.log | { grep -v "(C7519)" || true; }
n7519=$(grep -c "(C7519)" cmake-build/compile.log || true)
[ "$n7519" -gt 0 ] && echo "ptxas: $n7519 notes C7519 (warpgroup.arrive injected before a wgmma)"
if grep -q "(C7515)" cmake-build/compile.log; then
  echo "FAILED: ptxas serialised the wgmma instructions (C7515) of:"
  grep "(C7515)" cmake-build/compile.log | sed "s/.*function '\(.*\)'.*/\1/" | sort -u | c++filt | sed 's/^/  /'
  exit 1
fi
ctest --test-dir cmake-build --output-on-failure --no-tests=error
if command -v nvcc >/dev/null; then
  ls cmake-build/CMakeFiles/contrastbound_cuda_compile_check.dir/csrc/cuda/*.o 2>/dev/null \
    | sed 's/^/nvcc compiled: /' || echo "nvcc found, but there are no CUDA sources to compile"
fi
