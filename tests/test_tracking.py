"""What a run leaves in the MLflow store, read back from the store itself."""

from __future__ import annotations

import csv
import io
import tempfile

import pytest
import yaml

from ltbench.runner import execute
from ltbench.tracking import tracking_uri

from .conftest import run_config


def read(store, run_id, path):
    with tempfile.TemporaryDirectory() as scratch:
        return store.download(run_id, path, scratch).read_text()


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking_uri() == "sqlite:////elsewhere/x.db"
    assert tracking_uri("http://server:5000") == "http://server:5000"


def test_run_contents(store):
    config = run_config(
        "recipe.epochs=4", "train.eval_every=2", "seed=3", "tracking.experiment=contents"
    )
    outcome = execute(config)
    run = store.client.get_run(outcome.run_id)
    experiment = store.client.get_experiment(run.info.experiment_id)
    assert experiment.name == "contents" and run.info.status == "FINISHED"

    tags = run.data.tags
    assert tags["dataset"] == "digits_lt" and tags["method"] == "ce"
    assert tags["seed"] == "3" and tags["backbone"] == "resnet8"
    assert tags["fingerprint"] == outcome.fingerprint and len(outcome.fingerprint) == 16
    assert tags["data_canonical"] == "true" and tags["device"] == "cpu"
    for key in ("ltbench_version", "torch_version", "git_commit"):
        assert key in tags

    params = run.data.params
    assert params["recipe.epochs"] == "4" and params["seed"] == "3"
    assert params["dataset.options.imbalance_ratio"] == "50.0"

    for name in ("train_loss", "train_acc", "lr"):
        history = store.client.get_metric_history(outcome.run_id, name)
        assert [m.step for m in history] == [1, 2, 3, 4]
    test_history = store.client.get_metric_history(outcome.run_id, "test_acc")
    assert [m.step for m in test_history] == [2, 4]  # every 2 epochs, and the final one
    assert run.data.metrics["test_acc"] == pytest.approx(outcome.metrics["test_acc"])

    saved = yaml.safe_load(read(store, outcome.run_id, "config.yaml"))
    assert saved["recipe"]["epochs"] == 4 and saved["seed"] == 3
    assert saved["model"]["options"] == {"width": 16, "shortcut": "A"}

    rows = list(csv.DictReader(io.StringIO(read(store, outcome.run_id, "per_class.csv"))))
    assert [int(r["train_count"]) for r in rows] == [120, 77, 50, 32, 21, 13, 8, 5, 3, 2]
    assert [r["shot_group"] for r in rows] == ["many"] * 2 + ["medium"] * 3 + ["few"] * 5
    correct = sum(int(r["test_correct"]) for r in rows)
    assert correct / 400 * 100 == pytest.approx(run.data.metrics["test_acc"])
    few = [float(r["test_accuracy"]) for r in rows if r["shot_group"] == "few"]
    assert sum(few) / len(few) == pytest.approx(run.data.metrics["test_acc_few"], abs=1e-3)


def test_config_is_saved_before_training(store):
    config = run_config("method.name=ce", "recipe.lr=1e30", "tracking.experiment=explodes")
    with pytest.raises(Exception, match="NaN"):
        execute(config)
    run = store.client.search_runs(store.experiment_ids(["explodes"]))[0]
    assert run.info.status == "FAILED"
    assert yaml.safe_load(read(store, run.info.run_id, "config.yaml"))["recipe"]["lr"] == 1e30


def test_finished_runs_are_skipped_by_fingerprint_and_seed(store):
    first = execute(run_config())
    again = execute(run_config("train.log_every=7"))  # not in the fingerprint
    assert again.skipped and again.run_id == first.run_id
    other = execute(run_config("seed=1"))
    assert not other.skipped
