"""Every pair of registered methods either trains a step or is refused with a stated reason.

Driven by the registry, so methods added later (nbn, third-party plugins) are covered as soon
as they register; and by the README's composition table, whose every row is checked to do
what it says. A "step" is one epoch of one batch in each stage, on a cut-down digits_lt,
through the runner's own stage functions (no tracking store: the runner's store logic is
tested elsewhere).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from ltbench.data import TensorSplit
from ltbench.distributed import setup
from ltbench.errors import LtbenchError, PluginError
from ltbench.method import METHODS
from ltbench.runner import _first_stage, _second_stage, load_data
from ltbench.tracking import NoRunLog

from .conftest import run_config

README = Path(__file__).resolve().parents[1] / "README.md"

#: the forms a refusal takes (bench/method.py): each names the components involved
REFUSALS = (
    r"(\w+) and (\w+) both claim the \w+ of stage",
    r"(\w+) and (\w+) both declare a second stage",
    r"names (\w+) more than once",
    r"(\w+) refuses this composition: .*?(\w+)",
)


def composition_table() -> list[tuple[str, str, str]]:
    """(example, outcome, stated error) of each row of the README's composition table."""
    text = README.read_text()
    section = text[text.index("### What composes") :]
    table = section[section.index("|---") : section.index("\n\n", section.index("|---"))]
    rows = []
    for line in table.splitlines()[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        outcome, _, reason = cells[2].partition(":")
        stated = re.findall(r"`([^`]+)`", reason)
        for example in re.findall(r"`([^`]+)`", cells[1]):
            rows.append((example, outcome.strip(), stated[0] if stated else ""))
    return rows


@pytest.fixture(scope="module")
def digits():
    """digits_lt cut down for speed: a fifth of each class's training images (still long-tailed,
    one batch of 65), and 3 val images per class as val and test."""
    data = load_data(run_config())

    def first(split, per_class) -> TensorSplit:
        keep = torch.cat(
            [torch.nonzero(split.labels == c).flatten()[:n] for c, n in enumerate(per_class)]
        )
        return TensorSplit(split.images[keep], split.labels[keep])

    train = first(data.train, [max(1, int(n) // 5) for n in data.class_counts])
    val = first(data.val, [3] * data.num_classes)
    return dataclasses.replace(data, train=train, val=val, test=val)


@pytest.fixture(scope="module")
def attempt(digits):
    """``attempt(spec)`` -> ("trained", metrics) or ("refused", error): ``spec`` trained for one
    epoch per stage (its second stage too) and evaluated. Each spec is tried once and each first
    stage trained once; every attempt is seeded alike, so reuse gives the same result."""
    outcomes: dict[str, tuple[str, Any]] = {}
    stage1_states: dict[str, dict] = {}
    dist = setup("cpu")

    def train(spec: str) -> dict[str, float]:
        names = METHODS.components(spec)
        shortened = [
            f"method.options.{name}.epochs=1"
            for name in names
            if "epochs" in METHODS.resolve_options(name, {})[name]
        ]
        config = run_config(
            f"method.name={spec}", "recipe.epochs=1", "recipe.batch_size=128", *shortened
        )
        method = METHODS.compose(config.method.name, config.method.options)
        if method.second is None:
            return _first_stage(config, method, digits, dist, NoRunLog())[0]
        first = method.first_stage()
        if not first.components:
            first = METHODS.compose("ce")
        key = json.dumps([first.canonical, first.options], sort_keys=True, default=str)
        if key not in stage1_states:
            stage1_states[key] = _first_stage(config, first, digits, dist, NoRunLog())[1]
        return _second_stage(config, method, digits, dist, stage1_states[key], NoRunLog())[0]

    def attempt(spec: str) -> tuple[str, Any]:
        if spec not in outcomes:
            try:
                outcomes[spec] = ("trained", train(spec))
            except PluginError as error:
                outcomes[spec] = ("refused", error)
        return outcomes[spec]

    return attempt


def check_refusal(error: LtbenchError, spec: str) -> None:
    """The error is one of the stated refusals and names components of ``spec``."""
    message = str(error)
    match = next((m for m in (re.search(p, message) for p in REFUSALS) if m), None)
    assert match, f"{spec}: refused without a stated reason: {message}"
    names = set(spec.split("+"))
    for part in spec.split("+"):
        names |= set(METHODS.components(part))
    assert set(match.groups()) <= names, f"{spec}: the refusal names {match.groups()}"


def check_trained(metrics: dict[str, float], spec: str) -> None:
    assert metrics["test_count"] == 30, spec
    assert 0 <= metrics["test_acc"] <= 100 and math.isfinite(metrics["test_acc"]), spec


ALL_PAIRS = [f"{a}+{b}" for a, b in itertools.combinations(METHODS.names(), 2)]


@pytest.mark.parametrize("spec", [*METHODS.names(), *ALL_PAIRS])
def test_every_method_and_pair_trains_or_is_refused_with_a_reason(spec, attempt):
    outcome, result = attempt(spec)
    if outcome == "refused":
        check_refusal(result, spec)
    else:
        check_trained(result, spec)


@pytest.mark.parametrize(("example", "outcome", "stated"), composition_table())
def test_the_readme_composition_table_holds(example, outcome, stated, attempt):
    unregistered = [p for p in example.split("+") if p not in METHODS]
    if unregistered:
        pytest.skip(f"{unregistered[0]} is not registered on this branch")
    assert outcome in ("defined", "refused"), f"row {example}: outcome {outcome!r}"
    happened, result = attempt(example)
    if outcome == "refused":
        assert happened == "refused", f"{example} should be refused but trained"
        assert stated and stated in str(result), f"{example}: {result}"
    else:
        assert happened == "trained", f"{example} should train but: {result}"
        check_trained(result, example)


def test_the_table_covers_each_kind_of_refusal():
    refused = {example for example, outcome, _ in composition_table() if outcome == "refused"}
    assert {"cbs+pbs", "inv_freq+drw", "crt+lws", "ce+ldam", "ldam_drw+tau_norm"} <= refused
    defined = {example for example, outcome, _ in composition_table() if outcome == "defined"}
    assert {"ldam_drw+crt", "cbs+crt"} <= defined
