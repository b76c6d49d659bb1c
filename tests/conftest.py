"""Shared fixtures: a private MLflow store per test and short recipes for fast runs."""

from __future__ import annotations

import os

import pytest

from ltbench.config import RunConfig, parse_overrides, resolve_run
from ltbench.tracking import Tracker

# No usage telemetry (a network call) from MLflow in tests.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: a short schedule on digits_lt: a few seconds per run on a CPU
FAST = ["recipe.epochs=3", "recipe.warmup_epochs=1", "train.log_every=100"]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Tracker:
    """A fresh SQLite MLflow store in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return Tracker()


def run_config(*overrides: str) -> RunConfig:
    """A resolved digits_lt run config with the fast recipe and ``overrides`` on top."""
    return resolve_run([("test", parse_overrides([*FAST, *overrides]))])
