"""The engine: one run, repeatability, the learning-rate rule, NaN handling, the pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from ltbench.config import RecipeConfig
from ltbench.data import TensorSplit, epoch_indices
from ltbench.engine import lr_factor
from ltbench.errors import TrainingError
from ltbench.method import METHODS, Method
from ltbench.runner import execute

from .conftest import run_config


def test_one_run_trains_and_reports_every_group(store):
    outcome = execute(run_config("recipe.epochs=6"))
    metrics = outcome.metrics
    assert metrics["test_count"] == 400
    assert 30 < metrics["test_acc"] <= 100  # far above chance (10 %) after 6 epochs
    assert {"test_acc_many", "test_acc_medium", "test_acc_few"} <= set(metrics)
    assert metrics["test_acc_many"] > metrics["test_acc_few"]


def test_same_seed_same_numbers_other_seed_other_numbers(store):
    first = execute(run_config("tracking.experiment=a"))
    again = execute(run_config("tracking.experiment=b"))
    other = execute(run_config("tracking.experiment=c", "seed=1"))
    assert first.metrics == again.metrics
    for key, value in first.state.items():
        assert torch.equal(value, again.state[key]), key
    assert any(not torch.equal(v, other.state[k]) for k, v in first.state.items())


def test_lr_rule_of_the_cifar_recipe():
    recipe = RecipeConfig(epochs=200, lr=0.1)
    factors = [lr_factor(e, recipe) for e in range(200)]
    assert factors[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert factors[5] == factors[159] == 1.0
    assert factors[160] == factors[179] == 0.01
    assert factors[180] == factors[199] == 0.0001
    short = RecipeConfig(epochs=10)
    assert [lr_factor(e, short) for e in range(10)] == [1.0] * 8 + [0.01, 0.0001]


def test_cosine_schedule():
    recipe = RecipeConfig(epochs=10, schedule="cosine", warmup_epochs=0)
    factors = [lr_factor(e, recipe) for e in range(10)]
    assert factors[0] == 1.0 and math.isclose(factors[5], 0.5)
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))


class Exploding(Method):
    """Test-only: a loss that becomes NaN at the second step of the second epoch."""

    def __init__(self) -> None:
        self.calls = 0

    def build_loss(self, ctx):
        def loss(logits, targets, class_weights):
            self.calls += 1
            value = torch.nn.functional.cross_entropy(logits, targets)
            return value * float("nan") if self.calls == 6 + 2 else value

        return loss


@pytest.fixture(scope="module", autouse=True)
def exploding_method():
    if "test_exploding" not in METHODS:
        METHODS.add("test_exploding", Exploding)


def test_nan_loss_stops_the_run_naming_epoch_and_step(store):
    config = run_config("method.name=test_exploding", "recipe.batch_size=64")
    # 331 training images in batches of 64: 6 steps per epoch (the last has 11 images)
    with pytest.raises(TrainingError, match="NaN or infinite at epoch 2, step 2"):
        execute(config)
    run = store.client.search_runs(store.experiment_ids(["ltbench"]))[0]
    assert run.info.status == "FAILED"
    assert "epoch 2, step 2" in run.data.tags["error"]
    assert "test_acc" not in run.data.metrics


def test_sampling_draws_classes_with_the_given_probabilities():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    uniform = epoch_indices(labels, 3, lambda epoch: torch.ones(3) / 3, epoch=0, seed=0)
    drawn = torch.cat(
        [labels[epoch_indices(labels, 3, lambda e: torch.ones(3) / 3, e, 0)] for e in range(200)]
    )
    frequencies = torch.bincount(drawn, minlength=3).double() / len(drawn)
    assert torch.allclose(frequencies, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01)
    assert len(uniform) == 100
    plain = epoch_indices(labels, 3, None, epoch=0, seed=0)
    assert sorted(plain.tolist()) == list(range(100))  # a permutation
    assert not torch.equal(plain, epoch_indices(labels, 3, None, epoch=1, seed=0))


def test_tensor_pipeline_crops_flips_and_normalises_on_the_batch():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4) * 7
    split = TensorSplit(images, torch.tensor([0, 1]))
    recipe = RecipeConfig(crop_padding=1, flip=True)
    loader = split.loader(
        train=True, recipe=recipe, mean=(0.0,), std=(1.0,), device=torch.device("cpu"), seed=0
    )
    seen_flip = seen_shift = False
    for _ in range(20):
        ((batch, labels),) = loader.batches(torch.tensor([0, 1]), 2)
        assert batch.shape == (2, 1, 4, 4) and labels.tolist() == [0, 1]
        for original, out in zip(images.float() / 255, batch, strict=True):
            padded = torch.nn.functional.pad(original, (1, 1, 1, 1))
            windows = [padded[:, r : r + 4, c : c + 4] for r in range(3) for c in range(3)]
            candidates = windows + [w.flip(2) for w in windows]
            assert any(torch.allclose(out, w) for w in candidates)
            seen_flip |= not any(torch.allclose(out, w) for w in windows)
            seen_shift |= not torch.allclose(out, original) and not torch.allclose(
                out, original.flip(2)
            )
    assert seen_flip and seen_shift
    plain = split.loader(
        train=False, recipe=recipe, mean=(0.5,), std=(0.25,), device=torch.device("cpu"), seed=0
    )
    ((batch, _),) = plain.batches(torch.tensor([0, 1]), 2)
    assert torch.allclose(batch, (images.float() / 255 - 0.5) / 0.25)
