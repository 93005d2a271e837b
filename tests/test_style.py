"""Lint: ruff over the repository with the rules of pyproject.toml (pyflakes' undefined and unused names, syntax
errors, pycodestyle's statement errors). Skipped where ruff is not installed (scripts/setup.sh and the `test` extra
install it, so CI runs it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff() -> list[str]:
    pytest.importorskip("ruff", reason="ruff is not installed (pip install 'ruff>=0.17,<0.18', or the test extra)")
    return [sys.executable, "-m", "ruff"]


def test_ruff_check_passes():
    done = subprocess.run(_ruff() + ["check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ruff check found problems (fix them, or see [tool.ruff.lint]):\n{done.stdout}" \
        f"{done.stderr}"


def test_ruff_check_reports_an_undefined_name(tmp_path):
    # The rules really run (a config that selected nothing would pass everything): a file with an undefined name
    # and an unused import, checked with the repository's configuration, fails with both.
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    done = subprocess.run(_ruff() + ["check", "--no-cache", "--output-format", "concise", "--config",
                                     os.path.join(ROOT, "pyproject.toml"), str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "F821" in done.stdout and "F401" in done.stdout, done.stdout
