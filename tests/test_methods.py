"""The baseline methods' arithmetic, checked against values worked out by hand.

Samplers (empirical class frequencies over many draws), re-weighting, DRW's switch epoch,
LDAM's margins, cosine classifier and loss, and tau-norm's rescaling and search. The engine
runs of the decoupling methods are in test_methods_decoupling.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ltbench.data import epoch_indices
from ltbench.errors import ConfigError
from ltbench.method import METHODS, MethodContext
from ltbench.methods.drw import deferred_epoch
from ltbench.methods.ldam import CosineClassifier, ldam_margins
from ltbench.methods.tau_norm import tau_grid, tau_normalised

COUNTS = torch.tensor([400, 100, 25, 4])


def context(counts: torch.Tensor = COUNTS, epochs: int = 10, stage: str = "train"):
    return MethodContext(
        num_classes=len(counts),
        class_counts=counts,
        epochs=epochs,
        stage=stage,
        seed=0,
        device=torch.device("cpu"),
    )


def labels_of(counts: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def drawn_frequencies(
    method: str, epochs: int, at_epochs: list[int], seeds: range = range(1)
) -> torch.Tensor:
    """Class frequencies of the engine's epoch orders, pooled over ``at_epochs`` and ``seeds``."""
    sampling = METHODS.compose(method).class_sampling(context(epochs=epochs))
    labels = labels_of(COUNTS)
    drawn = torch.cat(
        [
            labels[epoch_indices(labels, 4, sampling, epoch, seed)]
            for epoch in at_epochs
            for seed in seeds
        ]
    )
    return torch.bincount(drawn, minlength=4).double() / len(drawn)


# -- samplers -------------------------------------------------------------------------------


def test_class_balanced_sampling_draws_every_class_equally():
    # 529 draws per epoch, 60 epochs: about 31,700 draws; each class 1/4
    frequencies = drawn_frequencies("cbs", epochs=60, at_epochs=list(range(60)))
    assert torch.allclose(frequencies, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)


def test_square_root_sampling_follows_sqrt_counts():
    # sqrt(400, 100, 25, 4) = 20, 10, 5, 2, out of 37
    frequencies = drawn_frequencies("sqrt", epochs=60, at_epochs=list(range(60)))
    expected = torch.tensor([20, 10, 5, 2], dtype=torch.float64) / 37
    assert torch.allclose(frequencies, expected, atol=0.01)


def test_progressive_sampling_moves_from_instance_to_class_balanced():
    epochs = 100
    instance = COUNTS.double() / COUNTS.sum()
    balanced = torch.full((4,), 0.25, dtype=torch.float64)
    start = drawn_frequencies("pbs", epochs, at_epochs=[0], seeds=range(40))
    assert torch.allclose(start, instance, atol=0.01)  # epoch 0 is instance-balanced
    # probabilities themselves: t / T of the way, by hand at t = 25 and t = 75 of 100
    probs = METHODS.compose("pbs").class_sampling(context(epochs=epochs))
    assert torch.allclose(probs(25), 0.75 * instance + 0.25 * balanced)
    assert torch.allclose(probs(75), 0.25 * instance + 0.75 * balanced)
    # the last ten epochs are 0.90 ... 0.99, on average 0.945, of the way to class-balanced
    late = drawn_frequencies("pbs", epochs, at_epochs=list(range(90, 100)), seeds=range(4))
    assert torch.allclose(late, 0.055 * instance + 0.945 * balanced, atol=0.01)


def test_samplers_give_empty_classes_no_probability():
    counts = torch.tensor([9, 0, 1])
    for method in ("cbs", "sqrt", "pbs"):
        probs = METHODS.compose(method).class_sampling(context(counts))(5)
        assert probs[1] == 0 and math.isclose(float(probs.sum()), 1.0)


def test_stage_two_methods_take_their_sampler_as_an_option():
    ctx = context(stage="crt")
    default = METHODS.compose("crt").components["crt"].class_sampling(ctx)
    assert torch.allclose(default(0), torch.full((4,), 0.25, dtype=torch.float64))
    sqrt = METHODS.compose("lws", {"lws": {"sampling": "sqrt"}}).components["lws"]
    assert torch.allclose(
        sqrt.class_sampling(ctx)(0)[:2], torch.tensor([20 / 37, 10 / 37]).double()
    )
    assert METHODS.compose("crt", {"crt": {"sampling": "instance"}}).class_sampling(ctx) is None
    with pytest.raises(ConfigError, match="sampling"):
        METHODS.compose("crt", {"crt": {"sampling": "balanced"}})


# -- re-weighting -----------------------------------------------------------------------------


def test_inverse_frequency_weights_by_hand():
    weights = METHODS.compose("inv_freq").class_weights(0, context(torch.tensor([100, 10, 1])))
    # 1/100, 1/10, 1 sum to 1.11; scaled to sum to 3
    expected = [3 * w / 1.11 for w in (0.01, 0.1, 1.0)]
    assert weights.tolist() == pytest.approx(expected, rel=1e-12)


def test_effective_number_weights_by_hand():
    beta = 0.9999
    weights = METHODS.compose("effective_number").class_weights(
        0, context(torch.tensor([100, 10, 1]))
    )
    raw = [(1 - beta) / (1 - beta**n) for n in (100, 10, 1)]  # about 0.01005, 0.10005, 1
    expected = [3 * w / sum(raw) for w in raw]
    assert weights.tolist() == pytest.approx(expected, rel=1e-9)
    assert float(weights.sum()) == pytest.approx(3.0)


@pytest.mark.parametrize(("epochs", "switch"), [(200, 160), (10, 8), (30, 24), (3, 2), (1, 0)])
def test_drw_switches_weights_at_the_deferred_epoch(epochs, switch):
    assert deferred_epoch(epochs, 0.8) == switch
    drw = METHODS.compose("drw")
    ctx = context(epochs=epochs)
    before = [drw.class_weights(e, ctx) for e in range(switch)]
    after = [drw.class_weights(e, ctx) for e in range(switch, epochs)]
    assert all(w is None for w in before)
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS.tolist()]
    expected = [4 * w / sum(raw) for w in raw]
    assert after and all(w.tolist() == pytest.approx(expected, rel=1e-9) for w in after)


def test_bad_beta_is_refused():
    with pytest.raises(ConfigError, match="beta must be in"):
        METHODS.compose("drw", {"drw": {"beta": 1.0}})


# -- LDAM ----------------------------------------------------------------------------------------


def test_ldam_margins_by_hand():
    # n^(-1/4) of 10000, 625, 81 = 1/10, 1/5, 1/3; scaled so the largest is 0.5
    margins = ldam_margins(torch.tensor([10000, 625, 81]), 0.5)
    assert margins.tolist() == pytest.approx([0.15, 0.3, 0.5], rel=1e-6)


def test_cosine_classifier_gives_cosines():
    classifier = CosineClassifier(2, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    logits = classifier(torch.tensor([[1.0, 0.0], [6.0, 8.0]]))
    expected = [[0.6, 0.0], [1.0, -0.8]]
    assert logits.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]


def test_ldam_loss_by_hand():
    # counts 16 and 1: n^(-1/4) = 1/2 and 1, so margins 0.25 and 0.5; s = 30
    ldam = METHODS.compose("ldam")
    loss = ldam.build_loss(context(torch.tensor([16, 1])))
    logits = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
    targets = torch.tensor([0, 1])
    # example 0: 30 * (0.5 - 0.25, 0.1) = (7.5, 3.0) -> log(1 + e^-4.5)
    # example 1: 30 * (0.2, 0.4 - 0.5) = (6.0, -3.0) -> log(1 + e^9)
    first, second = math.log1p(math.exp(-4.5)), math.log1p(math.exp(9.0))
    assert float(loss(logits, targets, None)) == pytest.approx((first + second) / 2, rel=1e-5)
    weights = torch.tensor([1.0, 3.0])
    weighted = (1 * first + 3 * second) / 4  # cross-entropy's weighted mean
    assert float(loss(logits, targets, weights)) == pytest.approx(weighted, rel=1e-5)


def test_ldam_replaces_the_classifier_with_a_cosine_one():
    from ltbench.models import MODELS

    model = MODELS.build("resnet8", 4, 1, {})
    ldam_drw = METHODS.compose("ldam_drw")
    assert ldam_drw.canonical == "drw+ldam"
    model = ldam_drw.adapt_model(model, context())
    assert isinstance(model.classifier, CosineClassifier)
    with torch.no_grad():
        logits = model(torch.randn(5, 1, 8, 8))
    assert logits.shape == (5, 4) and float(logits.abs().max()) <= 1 + 1e-5


# -- tau-norm -----------------------------------------------------------------------------------


def test_tau_normalisation_by_hand():
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2
    assert torch.equal(tau_normalised(weight, 0.0), weight)
    assert tau_normalised(weight, 1.0).tolist() == [pytest.approx([0.6, 0.8]), [0.0, 1.0]]
    half = tau_normalised(weight, 0.5)
    expected = [[3 / 5**0.5, 4 / 5**0.5], [0.0, 2 / 2**0.5]]
    assert half.tolist() == [pytest.approx(row) for row in expected]
    assert tau_normalised(weight, 2.0).tolist() == [pytest.approx([0.12, 0.16]), [0.0, 0.5]]
    grid = tau_grid(0.0, 2.0, 0.1)
    assert len(grid) == 21 and grid[0] == 0.0 and grid[10] == 1.0 and grid[-1] == 2.0


def test_tau_norm_chooses_tau_on_val_and_keeps_the_bias():
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(2, 2)

    model = Probe()
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
        model.classifier.bias.copy_(torch.tensor([0.5, -0.5]))
    seen = []

    def evaluate_val(m):
        # best when the two class weight norms are equal, which happens at tau = 1
        norms = m.classifier.weight.detach().norm(dim=1)
        seen.append(norms.tolist())
        return torch.tensor([1.0 - float(abs(norms[0] - norms[1])), float("nan")])

    tau_norm = METHODS.compose("tau_norm").components["tau_norm"]
    result = tau_norm.posthoc(model, evaluate_val, context(torch.tensor([9, 1]), stage="tau_norm"))
    assert result.chosen["tau"] == 1.0 and result.chosen["val_acc"] == pytest.approx(100.0)
    assert len(seen) == len(result.curve) == 21
    assert [row["tau"] for row in result.curve][:3] == [0.0, 0.1, 0.2]
    assert result.curve[0]["val_acc"] == pytest.approx(100 * (1 - 3))  # norms 5 and 2
    assert model.classifier.weight.tolist() == [pytest.approx([0.6, 0.8]), [0.0, 1.0]]
    assert model.classifier.bias.tolist() == [0.5, -0.5]


def test_the_default_suite_runs_every_built_in_method():
    from ltbench.suite import load_suite

    suite, _ = load_suite("default")
    built_in = [
        name
        for name in METHODS.names()
        if all(
            METHODS.get(c).__module__.startswith("ltbench.methods.")
            for c in METHODS.components(name)
        )
    ]
    assert {"ce", "ldam_drw", "crt", "tau_norm"} <= set(built_in)
    assert set(built_in) <= set(suite.methods)
    compositions = set(suite.methods) - set(built_in)
    assert compositions == {"ldam_drw+nbn", "crt+nbn", "lws+nbn", "tau_norm+nbn"}
    for name in compositions:
        assert set(METHODS.components(name)) <= set(built_in)
