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
  matplotlib tqdm scikit-learn 'ruff>=0.17,<0.18'
# The extension is rebuilt only when a source is newer than it, or it does not serve (SETUP_REBUILD=1 forces):
# every make target runs this script, and a rebuild costs minutes on two cores.
so=$(ls contrastbound/_C*.so 2>/dev/null | head -n 1 || true)
if [ "${SETUP_REBUILD:-0}" != "1" ] && [ -n "$so" ] \
  && [ -z "$(find csrc setup.py CMakeLists.txt -type f -newer "$so" -print -quit)" ] \
  && python -c "import sys, contrastbound; sys.exit(0 if contrastbound.backend_info()['cpu'] == 'kernel' else 1)" \
    >/dev/null 2>&1; then
  echo "contrastbound: extension $so is up to date, not rebuilt (SETUP_REBUILD=1 forces a rebuild)"
else
  python -m pip install -q --no-build-isolation --no-deps -e .
fi
python -c "import contrastbound, json; print('contrastbound backends:', json.dumps(contrastbound.backend_info()))"
