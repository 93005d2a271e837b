# One entry point: set-up, test, reproduce (the main job), demo, bench.
.PHONY: setup test test-python test-cpp checkstyle reproduce reproduce-quick demo bench bench-quick bench-scaling bench-scaling-quick clean

setup:
	bash scripts/setup.sh

# C++ tests and the nvcc compile check first, then pytest, whose summary closes the output.
test: setup
	bash scripts/cpp_tests.sh
	.venv/bin/python -m pytest -q

test-python:
	.venv/bin/python -m pytest -q

test-cpp:
	bash scripts/cpp_tests.sh

# Lint (ruff, the rules in pyproject.toml); also run by the tests (tests/test_style.py).
checkstyle:
	.venv/bin/python -m ruff check .

# The main job: reproduce the paper's claims (figures, CSVs, report) into ./contrastbound-results.
reproduce: setup
	.venv/bin/python -m contrastbound reproduce

reproduce-quick: setup
	.venv/bin/python -m contrastbound reproduce --quick

demo: setup
	.venv/bin/python -m contrastbound demo

# Into contrastbound-results/ (not the tracked benchmarks/results/, the data behind README's table).
bench: setup
	.venv/bin/python benchmarks/bench_infonce.py --out contrastbound-results/bench_infonce

bench-quick: setup
	.venv/bin/python benchmarks/bench_infonce.py --quick --out contrastbound-results/bench_infonce_quick

# The scaling suite beside naive PyTorch and the peers that import (see benchmarks/results/README.md).
bench-scaling: setup
	.venv/bin/python -m contrastbound bench

bench-scaling-quick: setup
	.venv/bin/python -m contrastbound bench --quick

clean:
	rm -rf build cmake-build cmake-build.log contrastbound/_C*.so *.egg-info
