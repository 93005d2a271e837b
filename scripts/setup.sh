#!/usr/bin/env bash
# Creates .venv in the repository root, installs torch==2.13.0 only where the venv has no torch (never an
# unpinned torch: that would pull a multi-GB CUDA build), the build and test tools, and builds the extension
# against that torch with --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q setuptools wheel ninja pybind11 numpy pytest hypothesis mpmath expecttest \
  matplotlib tqdm scikit-learn
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import contrastbound, json; print('contrastbound backends:', json.dumps(contrastbound.backend_info()))"
