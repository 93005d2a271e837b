"""One forward + backward of the fused loss on the tensor-core path, for a profiler (ncu) to look at.

    ncu --clock-control none -k regex:"tc_(lse|rows)_kernel" -c 3 --section WarpStateStats ... \
        python benchmarks/profile_tc.py [--B 8192] [--K 65536] [--d 256]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=8192)
    ap.add_argument("--K", type=int, default=65536)
    ap.add_argument("--d", type=int, default=256)
    args = ap.parse_args()
    if min(args.B, args.K, args.d) < 1:
        ap.error(f"--B, --K and --d must be >= 1, got {args.B}, {args.K}, {args.d}")
    if not torch.cuda.is_available():
        print("profile_tc.py: no CUDA device is available to this torch: nothing to profile", file=sys.stderr)
        return 1
    import contrastbound as cb

    g = torch.Generator(device="cuda").manual_seed(0)
    a, p, n = (torch.randn(r, args.d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
               for r in (args.B, args.B, args.K))
    cb.info_nce(a, p, n, temperature=0.07).backward()
    torch.cuda.synchronize()
    print("profiled one forward + backward:", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
