"""The training examples run a few steps and produce finite losses and an evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import load_module

pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    return load_module(EXAMPLES / f"{name}.py", name)


@pytest.mark.parametrize(
    "name,argv",
    [
        ("moco_digits", ["--steps", "12", "--queue", "256", "--batch", "32", "--log-every", "6"]),
        ("simclr_digits", ["--steps", "12", "--batch", "64", "--log-every", "6", "--learn-temperature"]),
    ],
)
def test_example_runs_a_few_steps(name, argv):
    result = _load(name).main(argv)
    assert math.isfinite(result["final_loss"])
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert math.isfinite(result["test_supervised_loss"])
