"""The method contract can express every later method: a test-only toy fills each slot.

ToyEverySlot changes the model, the loss, the class weights (switching at an epoch), the
sampler and the epoch boundary, and adds a post-hoc transform chosen on val; ToyRetrain adds
a second stage on the frozen backbone. Composed as ``toy_every+toy_retrain`` they run through
the real engine and store, and each slot's effect is checked.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltbench.errors import PluginError
from ltbench.method import (
    METHODS,
    Method,
    PosthocResult,
    SecondStage,
    claimed_slots,
    cross_entropy,
)
from ltbench.runner import execute

from .conftest import run_config

SWITCH_EPOCH = 2


class LogitScale(nn.Module):
    """Wraps a classifier and multiplies its logits by a learnable scalar."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.inner = classifier
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, features):
        return self.inner(features) * self.scale


class ToyEverySlot(Method):
    """Test-only method filling every first-stage slot and a post-hoc transform."""

    seen: dict[str, list] = {}

    def __init__(self, label_smoothing: float = 0.1) -> None:
        self.label_smoothing = label_smoothing
        ToyEverySlot.seen = {"epochs": [], "weights": [], "val_calls": []}

    def adapt_model(self, model, ctx):
        model.classifier = LogitScale(model.classifier)
        return model

    def build_loss(self, ctx):
        def loss(logits, targets, class_weights):
            self.seen["weights"].append(None if class_weights is None else class_weights.clone())
            return nn.functional.cross_entropy(
                logits, targets, weight=class_weights, label_smoothing=self.label_smoothing
            )

        return loss

    def class_weights(self, epoch, ctx):
        if epoch < SWITCH_EPOCH:
            return None
        weights = 1.0 / ctx.class_counts.double()
        return weights / weights.sum() * ctx.num_classes

    def class_sampling(self, ctx):
        return lambda epoch: torch.full((ctx.num_classes,), 1.0 / ctx.num_classes)

    def on_epoch_start(self, epoch, model, ctx):
        self.seen["epochs"].append((ctx.stage, epoch))

    def posthoc(self, model, evaluate_val, ctx):
        curve = []
        for temperature in (0.5, 1.0, 2.0):
            model.classifier.scale.data.mul_(temperature)
            accuracy = float(evaluate_val(model).mean())
            model.classifier.scale.data.div_(temperature)
            curve.append({"temperature": temperature, "val_acc": accuracy})
            self.seen["val_calls"].append(temperature)
        best = max(curve, key=lambda row: row["val_acc"])
        return PosthocResult(model, {"temperature": best["temperature"]}, curve)


class ToyRetrain(Method):
    """Test-only second stage: re-initialise the classifier, retrain it class-balanced."""

    seen: dict[str, list] = {}

    def __init__(self) -> None:
        ToyRetrain.seen = {"stages": []}

    def adapt_model(self, model, ctx):
        self.seen["stages"].append(ctx.stage)
        model.classifier.inner.reset_parameters()
        return model

    def class_sampling(self, ctx):
        counts = ctx.class_counts.double()
        return lambda epoch: counts.sqrt() / counts.sqrt().sum()

    def second_stage(self):
        return SecondStage("toy_retrain", epochs=2, recipe={"lr": 0.01, "schedule": "cosine"})


class ToyLoss(Method):
    """Test-only: another loss, to clash with ToyEverySlot."""

    def build_loss(self, ctx):
        return cross_entropy


@pytest.fixture(scope="module", autouse=True)
def toys():
    for name, cls in [
        ("toy_every", ToyEverySlot),
        ("toy_retrain", ToyRetrain),
        ("toy_loss", ToyLoss),
    ]:
        if name not in METHODS:
            METHODS.add(name, cls)


def test_slots_are_read_from_the_overridden_hooks():
    assert set(claimed_slots(ToyEverySlot)) == {
        "model",
        "loss",
        "class_weights",
        "sampler",
        "epoch_start",
        "posthoc",
    }
    assert set(claimed_slots(ToyRetrain)) == {"model", "sampler", "stage"}


def test_every_slot_acts_through_the_engine(store):
    config = run_config(
        "method.name=toy_every+toy_retrain",
        "recipe.epochs=4",
        "method.options.toy_every.label_smoothing=0.2",
    )
    outcome = execute(config)
    client = store.client
    stage2 = client.get_run(outcome.run_id)
    stage1 = client.get_run(stage2.data.tags["stage1_run_id"])

    # stage 1 trained the first-stage components, as its own run
    assert stage1.data.tags["method"] == "toy_every"
    assert stage1.info.status == stage2.info.status == "FINISHED"
    assert [e for s, e in ToyEverySlot.seen["epochs"] if s == "train"] == [0, 1, 2, 3]
    # class weights switch at SWITCH_EPOCH and reach the loss
    weights = ToyEverySlot.seen["weights"]
    steps_per_epoch = len(weights) // 4
    assert all(w is None for w in weights[: SWITCH_EPOCH * steps_per_epoch])
    assert all(w is not None for w in weights[SWITCH_EPOCH * steps_per_epoch :])
    # the post-hoc search ran on val, and its choice and curve were logged
    assert ToyEverySlot.seen["val_calls"] == [0.5, 1.0, 2.0]
    assert stage1.data.params["posthoc.temperature"] in {"0.5", "1.0", "2.0"}
    curve = client.download_artifacts(
        stage1.info.run_id, "posthoc_curve.csv", str(store_dir(store))
    )
    with open(curve) as handle:
        assert handle.read().startswith("temperature,val_acc")
    # the model slot added exactly one parameter, which trained
    state = outcome.state
    assert "classifier.scale" in state and float(state["classifier.scale"]) != 1.0

    # stage 2: its own run, linked, two epochs at the stage's learning rate
    assert ToyRetrain.seen["stages"] == ["toy_retrain"]
    history = client.get_metric_history(outcome.run_id, "lr")
    assert [m.step for m in history] == [1, 2] and history[0].value == pytest.approx(0.01)
    assert stage2.data.tags["method"] == "toy_every+toy_retrain"
    assert stage2.data.metrics["test_count"] == 400


def test_second_stage_keeps_the_frozen_backbone(store):
    config = run_config("method.name=toy_every+toy_retrain", "recipe.epochs=2")
    outcome = execute(config)
    stage2 = store.client.get_run(outcome.run_id)
    stage1_state = torch.load(
        store.download(
            stage2.data.tags["stage1_run_id"], "checkpoints/final.pt", str(store_dir(store))
        ),
        weights_only=True,
    )["model"]
    backbone = [k for k in stage1_state if k.startswith("backbone.")]
    assert backbone and all(torch.equal(stage1_state[k], outcome.state[k]) for k in backbone)
    assert not torch.equal(
        stage1_state["classifier.inner.weight"], outcome.state["classifier.inner.weight"]
    )


def test_stage_one_is_reused_not_retrained(store):
    first = execute(run_config("method.name=toy_every+toy_retrain", "recipe.epochs=2"))
    ToyEverySlot.seen["epochs"].clear()
    second = execute(
        run_config(
            "method.name=toy_every+toy_retrain", "recipe.epochs=2", "tracking.experiment=elsewhere"
        )
    )
    assert ToyEverySlot.seen["epochs"] == []  # found in the store by fingerprint and seed
    link = "stage1_run_id"
    tags = [store.client.get_run(o.run_id).data.tags[link] for o in (first, second)]
    assert tags[0] == tags[1]


def test_clashing_slots_are_refused_naming_both():
    with pytest.raises(PluginError, match="toy_every and toy_loss both claim the loss"):
        METHODS.compose("toy_every+toy_loss")
    with pytest.raises(PluginError, match="ce and toy_loss both claim the loss"):
        METHODS.compose("ce+toy_loss")
    with pytest.raises(PluginError, match="names ce more than once"):
        METHODS.compose("ce+ce")


def test_two_second_stages_are_refused():
    class OtherStage(ToyRetrain):
        """Test-only: a second second stage."""

    if "toy_other_stage" not in METHODS:
        METHODS.add("toy_other_stage", OtherStage)
    with pytest.raises(PluginError, match="both declare a second stage"):
        METHODS.compose("toy_retrain+toy_other_stage")


def store_dir(store):
    return store.uri.removeprefix("sqlite:///").rpartition("/")[0]
