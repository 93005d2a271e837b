"""Large-K scaling benchmark: a thin wrapper around `contrastbound bench` (same options).

    python benchmarks/bench_scaling.py --quick
    python benchmarks/bench_scaling.py --modes shared --k-min 12 --out benchmarks/results --prefix scaling_cpu_shared

See `python benchmarks/bench_scaling.py --help` and benchmarks/results/README.md.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from contrastbound.benchsuite import main

    sys.exit(main(sys.argv[1:]))
