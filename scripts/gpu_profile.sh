#!/usr/bin/env bash
# Builds the CUDA extension on a GPU machine and profiles the tensor-core kernels with Nsight Compute:
#   scripts/gpu_profile.sh OUTDIR        (writes build.log, ncu.txt and the built extension into OUTDIR)
# Builds unless the extension for this interpreter is there and loads its CUDA kernels (or REBUILD is set), for
# ARCH (default: the GPU's compute capability, 9.0a on an H100/H200). The opt-in kernels are profiled where their
# switches are set in the environment (CONTRASTBOUND_TC_FLASH=1, CONTRASTBOUND_TC_WGMMA=1, ...: profile_tc.py runs
# what the library picks). scripts/gpu_check.sh runs it only where PROFILE_S > 0: Nsight Compute needs the GPU's hardware counters,
# which it could not read on this project's gVisor GPU machines ("LibraryNotLoaded"; it did on Firecracker ones);
# bench_gpu.py --kernels (torch.profiler, which gpu_check.sh runs) gives each kernel's time everywhere.
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 64
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
START=$(date +%s)
if [ -n "${REBUILD:-}" ] || ! "$PY" -c 'import sys, contrastbound; sys.exit(contrastbound.backend_info()["cuda"] != "kernel")' \
    >/dev/null 2>&1; then
  CAP_PY='import torch; m, n = torch.cuda.get_device_capability()
print(f"{m}.{n}" + ("a" if (m, n) == (9, 0) else ""))'
  ARCH=${ARCH:-$("$PY" -c "$CAP_PY" 2>/dev/null || echo 9.0a)}
  FORCE_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$ARCH" timeout 200 "$PY" setup.py build_ext --inplace \
    >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
echo "build done at $(($(date +%s) - START)) s"
cp contrastbound/_C*.so "$OUT/" 2>/dev/null
timeout 150 ncu --clock-control none -k regex:"(tc|mma)_(lse|rows|fwd)_kernel|flash_kernel|wgmma_kernel" -c 3 --section SpeedOfLight --section Occupancy \
  --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  "$PY" benchmarks/profile_tc.py ${PROFILE_ARGS:-} >"$OUT/ncu.txt" 2>&1
echo "ncu exit $? at $(($(date +%s) - START)) s"
grep -E "(tc|mma)_(lse|rows|fwd)_kernel|flash_kernel|wgmma_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Shared Memory Config|Dynamic Shared|Block Limit|Warp Cycles Per Issued|Stall|Issue Slots Busy|Executed Ipc|L1/TEX Hit|L2 Hit|Pipe|Bank" "$OUT/ncu.txt" | head -150
