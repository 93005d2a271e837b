# One entry point: set-up, test, demo (the main job), bench.
.PHONY: setup test test-python test-cpp demo bench bench-quick clean

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

demo: setup
	.venv/bin/python -m contrastbound demo

bench: setup
	.venv/bin/python benchmarks/bench_infonce.py

bench-quick: setup
	.venv/bin/python benchmarks/bench_infonce.py --quick

clean:
	rm -rf build cmake-build cmake-build.log contrastbound/_C*.so *.egg-info
