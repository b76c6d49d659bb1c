"""The worked example plugin package installs with pip, registers through its entry point, and
trains: examples/ltbench-focal, exactly as a contributor would ship a method (no network).

The global registry has loaded its entry points before this test puts the package on the path,
so the test loads a fresh MethodRegistry, as a new process would."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltbench.distributed import setup
from ltbench.method import MethodContext, MethodRegistry
from ltbench.runner import _first_stage, load_data
from ltbench.tracking import NoRunLog

from .conftest import run_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ltbench-focal"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example installed with pip into a folder of its own (from a copy, so the build
    leaves nothing in the source tree)."""
    root = tmp_path_factory.mktemp("example")
    source = shutil.copytree(EXAMPLE, root / "source")
    target = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (target / "ltbench_focal.py").is_file()
    return target


def test_a_fresh_registry_finds_it_through_the_entry_point(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    registry = MethodRegistry()
    assert "focal" in registry.names()
    assert registry.describe("focal").startswith("Focal loss")
    assert "entry point 'focal' of ltbench-focal" in registry._origins["focal"]

    # its loss, by hand: p_t = 0.5 for two equal logits; 0.25 * log 2 at gamma 2
    composed = registry.compose("focal", {"focal": {"gamma": 2.0}})
    ctx = MethodContext(2, torch.tensor([5, 1]), 1, "train", 0, torch.device("cpu"))
    loss = composed.build_loss(ctx)
    logits, targets = torch.zeros(1, 2), torch.tensor([0])
    assert float(loss(logits, targets, None)) == pytest.approx(0.25 * math.log(2))
    plain = registry.compose("focal", {"focal": {"gamma": 0.0}}).build_loss(ctx)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, targets)
    assert float(plain(logits, targets, None)) == pytest.approx(float(ce))  # gamma 0: CE


def test_it_trains_through_the_engine(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    focal = MethodRegistry().compose("focal", {"focal": {"gamma": 1.0}})
    config = run_config("recipe.epochs=4")
    data = load_data(config)
    metrics, state = _first_stage(config, focal, data, setup("cpu"), NoRunLog())
    assert metrics["test_count"] == 400
    assert 20 < metrics["test_acc"] <= 100  # well above chance (10 %) after 4 epochs
