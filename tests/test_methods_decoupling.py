"""Decoupling through the real runner and store: cRT, LWS and tau-norm on a stage-1 run.

One module-wide store: the first test trains the plain cross-entropy stage 1, the others find
and reuse it (by fingerprint and seed), as a suite would.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from ltbench.distributed import setup
from ltbench.engine import Evaluator
from ltbench.methods.tau_norm import tau_normalised
from ltbench.models import MODELS
from ltbench.runner import execute, load_data
from ltbench.tracking import CHECKPOINT, Tracker

from .conftest import run_config


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoupling")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        yield Tracker()


def run(tracker: Tracker, method: str, *overrides: str):
    outcome = execute(run_config(f"method.name={method}", *overrides), tracker)
    stage2 = tracker.client.get_run(outcome.run_id)
    stage1_id = stage2.data.tags["stage1_run_id"]
    folder = Path.cwd() / f"download-{outcome.run_id}"
    folder.mkdir()
    checkpoint = tracker.download(stage1_id, CHECKPOINT, str(folder))
    stage1_state = torch.load(checkpoint, weights_only=True)["model"]
    return outcome, stage2, stage1_id, stage1_state


def test_crt_retrains_a_fresh_classifier_and_leaves_the_backbone_alone(tracker):
    outcome, stage2, stage1_id, stage1_state = run(tracker, "crt", "method.options.crt.epochs=2")
    stage1 = tracker.client.get_run(stage1_id)
    assert stage1.data.tags["method"] == "ce"  # cRT alone: stage 1 is plain cross-entropy

    backbone = [k for k in stage1_state if k.startswith("backbone.")]
    statistics = [k for k in backbone if "running_" in k or "num_batches" in k]
    assert len(statistics) == 3 * 7  # resnet8: 7 BN layers, mean, var, batch count each
    for key in backbone:
        assert torch.equal(stage1_state[key], outcome.state[key]), key
    assert set(outcome.state) == set(stage1_state)
    assert not torch.equal(stage1_state["classifier.weight"], outcome.state["classifier.weight"])

    # the stage-2 recipe: 2 epochs, no warm-up, cosine from stage 1's lr (digits_lt: 0.05)
    lrs = [m.value for m in tracker.client.get_metric_history(outcome.run_id, "lr")]
    assert lrs == pytest.approx([0.05, 0.025])
    assert stage2.data.params["method.options.crt.sampling"] == "cbs"


def test_lws_changes_only_the_scales(tracker):
    outcome, _, _, stage1_state = run(tracker, "lws", "method.options.lws.epochs=2")
    renamed = {k.replace("classifier.", "classifier.inner.", 1): v for k, v in stage1_state.items()}
    assert set(outcome.state) == set(renamed) | {"classifier.scales"}
    for key, value in renamed.items():
        assert torch.equal(value, outcome.state[key]), key
    scales = outcome.state["classifier.scales"]
    assert scales.shape == (10,) and not torch.equal(scales, torch.ones(10))


def test_tau_norm_chooses_tau_on_val_and_reports_the_transformed_model(tracker):
    outcome, stage2, _, stage1_state = run(tracker, "tau_norm")
    chosen = float(stage2.data.params["posthoc.tau"])
    folder = Path.cwd() / "curve"
    curve = pd.read_csv(
        tracker.client.download_artifacts(outcome.run_id, "posthoc_curve.csv", str(folder))
    )
    assert curve["tau"].round(1).tolist() == [round(0.1 * i, 1) for i in range(21)]
    best = curve[curve["val_acc"] == curve["val_acc"].max()]["tau"].min()
    assert math.isclose(chosen, best)

    # recompute by hand: the stage-1 model on val (tau 0), and with the chosen tau on test
    config = run_config("method.name=tau_norm")
    data = load_data(config)
    dist = setup("cpu")
    model = MODELS.build("resnet8", 10, 1, {})
    model.load_state_dict(stage1_state)
    val = Evaluator(data.val, data, dist, config.train, 64, config.recipe)
    assert 100 * float(val(model).per_class_accuracy.mean()) == pytest.approx(curve["val_acc"][0])
    with torch.no_grad():
        model.classifier.weight.copy_(tau_normalised(model.classifier.weight, chosen))
    test = Evaluator(data.test, data, dist, config.train, 64, config.recipe)
    tally = test(model)
    assert 100 * float(tally.correct.sum()) / tally.count == pytest.approx(
        outcome.metrics["test_acc"]
    )


def test_stage_one_was_trained_once_and_reused(tracker):
    runs = tracker.runs(tracker.experiment_ids(["ltbench"]))
    assert sorted(runs["tags.method"]) == ["ce", "crt", "lws", "tau_norm"]
    stage1 = runs.loc[runs["tags.method"] == "ce", "run_id"].item()
    links = runs.loc[runs["tags.method"] != "ce", "tags.stage1_run_id"]
    assert (links == stage1).all()
