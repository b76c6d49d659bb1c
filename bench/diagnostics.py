"""The diagnostics behind NBN's claim, logged as artifacts of every run (``train.diagnostics``).

NBN's argument (Bao et al., IEEE TIP 2024) is that long-tailed training makes the features
that single out rare classes weaker, through the last stage's BN weights. Two measurements
let a reader check that on any run, with or without NBN.

**Feature strength.** For a test image ``x`` of class ``c``, let ``f(x)`` be the backbone's
pooled penultimate features and ``w_c`` the classifier's weight vector for class ``c``. The
feature strength of class ``c`` is

    S_c = mean over the test images x of class c of  <w_c / ||w_c||, f(x)>,

the length of the features' projection on the class's own classifier direction. The logit is
``w_c . f(x) = ||w_c|| * <w_c / ||w_c||, f(x)>`` (plus a bias): ``S_c`` is the part the
features supply, free of the classifier norm ``||w_c||``, which carries a classifier-level
bias of its own, and unchanged by per-class rescaling of ``w_c`` (tau-norm, LWS). Because NBN
rescales the last stage, absolute strengths of two models are not comparable; the *relative*
strength ``S_c / mean_k |S_k|`` is (1 = an average class when all are positive; a projection
can be negative early in training, or with a cosine classifier, and keeps its sign). Also
logged per class: the mean feature norm ``||f(x)||`` and ``||w_c||``. Run-level summaries, as
metrics:

- ``diag_strength_count_corr``: Spearman rank correlation of ``S_c`` with the training count
  (positive: frequent classes have the stronger features; 0: strength even over the counts);
- ``diag_strength_few_many``: mean ``S_c`` of the few-shot classes over that of the many-shot
  classes (when both groups have classes and the many-shot mean is positive); below 1:
  rare-class features are weaker;
- ``diag_strength_cv``: the spread of ``S_c`` over classes, ``std_c S_c / mean_c |S_c|``.

The classifier weight is ``model.classifier.weight``, or else the first ``(classes, features)``
parameter inside the classifier; a classifier without one gets no strength table.

**BN weights.** For each BN layer of the backbone's last stage (the ``layer<N>`` child with the
largest N; every BN layer when there is no such stage), each channel's weight and bias as
stored, and as applied: for an NBN layer ``alpha * w / (||w|| + 1e-6)`` (and the same for the
bias), for a plain BN layer the stored values.

Artifacts: ``diagnostics/feature_strength.csv`` and ``.png`` (relative strength against the
training count), ``diagnostics/bn_weights.csv`` and ``.png`` (applied weights per layer).
:func:`compare` overlays the tables of several runs (``ltbench diagnostics``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from ltbench.data import LongTailData
from ltbench.engine import Evaluator
from ltbench.errors import LtbenchError
from ltbench.methods.nbn import stage_names
from ltbench.tracking import RunLog, Tracker

log = logging.getLogger(__name__)

FOLDER = "diagnostics"
STRENGTH_CSV = f"{FOLDER}/feature_strength.csv"
BN_CSV = f"{FOLDER}/bn_weights.csv"
GROUP_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def classifier_weight(model: nn.Module, num_classes: int, num_features: int) -> torch.Tensor | None:
    """The ``(classes, features)`` weight of the model's classifier, if it has one."""
    classifier = getattr(model, "classifier", None)
    if classifier is None:
        return None
    shape = (num_classes, num_features)
    weight = getattr(classifier, "weight", None)
    if isinstance(weight, torch.Tensor) and tuple(weight.shape) == shape:
        return weight.detach()
    for parameter in classifier.parameters():
        if tuple(parameter.shape) == shape:
            return parameter.detach()
    return None


@torch.no_grad()
def feature_strength(
    model: nn.Module, evaluator: Evaluator, data: LongTailData
) -> pd.DataFrame | None:
    """Per-class feature strength on the evaluator's split (each image counted once over all
    ranks), or None when the classifier has no ``(classes, features)`` weight."""
    weight = classifier_weight(model, data.num_classes, model.num_features)
    if weight is None:
        return None
    dist = evaluator.dist
    weight = weight.double().to(dist.device)
    direction = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, data.num_classes, dtype=torch.float64, device=dist.device)
    for images, labels in evaluator.batches():
        features = model.backbone(images).flatten(1).double()
        sums[0].index_add_(0, labels, torch.ones_like(features[:, 0]))
        sums[1].index_add_(0, labels, features.norm(dim=1))
        sums[2].index_add_(0, labels, (features * direction[labels]).sum(dim=1))
    model.train(was_training)
    sums = dist.all_reduce_sum(sums).cpu()
    return strength_table(sums, weight.norm(dim=1).cpu(), data)


def strength_table(
    sums: torch.Tensor, weight_norm: torch.Tensor, data: LongTailData
) -> pd.DataFrame:
    """The per-class table from summed ``(count, feature norm, projection)`` rows."""
    count = sums[0].clamp_min(1)
    strength = (sums[2] / count).numpy()
    group_of = {c: group for group, members in data.shot_groups.items() for c in members}
    seen = sums[0].numpy() > 0
    return pd.DataFrame(
        {
            "class": range(data.num_classes),
            "name": data.class_names,
            "train_count": data.class_counts.tolist(),
            "shot_group": [group_of[c] for c in range(data.num_classes)],
            "test_count": sums[0].long().tolist(),
            "feature_norm": (sums[1] / count).numpy(),
            "classifier_norm": weight_norm.numpy(),
            "feature_strength": strength,
            "relative_strength": strength / np.abs(strength[seen]).mean(),
        }
    )


def strength_summary(table: pd.DataFrame) -> dict[str, float]:
    """Scale-free summaries of a strength table (see the module docstring); NaN ones left out."""
    seen = table[table["test_count"] > 0]
    strength = seen["feature_strength"]
    summary = {
        "diag_strength_count_corr": _rank_correlation(seen["train_count"], strength),
        "diag_strength_cv": float(strength.std(ddof=0) / strength.abs().mean()),
    }
    by_group = seen.groupby("shot_group")["feature_strength"].mean()
    if "few" in by_group and "many" in by_group and by_group["many"] > 0:
        summary["diag_strength_few_many"] = float(by_group["few"] / by_group["many"])
    return {k: v for k, v in summary.items() if np.isfinite(v)}


def _rank_correlation(a: pd.Series, b: pd.Series) -> float:
    if a.nunique() < 2 or b.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(a.rank().to_numpy(), b.rank().to_numpy())[0, 1])


def last_stage(backbone: nn.Module) -> tuple[str, nn.Module]:
    """The backbone's last ``layer<N>`` stage, or the whole backbone when it has none."""
    names = stage_names(backbone)
    return (names[-1], backbone.get_submodule(names[-1])) if names else ("", backbone)


@torch.no_grad()
def bn_weights(model: nn.Module) -> pd.DataFrame:
    """One row per channel of every BN layer in the last stage: stored and applied weights."""
    stage, module = last_stage(model.backbone)
    rows = []
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm) or not layer.affine:
            continue
        path = f"{stage}.{name}" if stage else name
        normalized = hasattr(layer, "normalized_weight")
        weight = layer.normalized_weight() if normalized else layer.weight
        bias = layer.normalized_bias() if normalized else layer.bias
        alpha = float(layer.alpha) if normalized else float("nan")
        for channel in range(layer.num_features):
            rows.append(
                {
                    "layer": path,
                    "normalized": normalized,
                    "alpha": alpha,
                    "channel": channel,
                    "weight": float(layer.weight[channel]),
                    "bias": float(layer.bias[channel]),
                    "applied_weight": float(weight[channel]),
                    "applied_bias": float(bias[channel]),
                }
            )
    columns = ["layer", "normalized", "alpha", "channel", "weight", "bias"]
    return pd.DataFrame(rows, columns=[*columns, "applied_weight", "applied_bias"])


def strength_figure(tables: dict[str, pd.DataFrame], title: str) -> Figure:
    """Relative feature strength against the training count (log scale), one series per
    label; a single series is coloured by shot group."""
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for label, table in tables.items():
        table = table.sort_values("train_count")
        if len(tables) == 1:
            colours = [GROUP_COLOURS.get(g, "grey") for g in table["shot_group"]]
            axes.plot(table["train_count"], table["relative_strength"], color="lightgrey")
            axes.scatter(table["train_count"], table["relative_strength"], c=colours, zorder=3)
        else:
            axes.plot(table["train_count"], table["relative_strength"], marker="o", label=label)
    axes.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    axes.set_xscale("log")
    axes.set_xlabel("training images of the class")
    axes.set_ylabel("relative feature strength  S_c / mean |S|")
    axes.set_title(title)
    if len(tables) > 1:
        axes.legend()
    return figure


def bn_figure(tables: dict[str, pd.DataFrame], title: str) -> Figure:
    """Applied last-stage BN weights, one box per layer (and per label when comparing)."""
    figure = Figure(figsize=(max(6.4, 0.9 * _box_count(tables)), 4.2), layout="constrained")
    axes = figure.add_subplot()
    values, names = [], []
    for label, table in tables.items():
        for layer, rows in table.groupby("layer", sort=False):
            values.append(rows["applied_weight"].to_numpy())
            name = f"{layer} (NBN)" if rows["normalized"].any() else layer
            names.append(name if len(tables) == 1 else f"{label}\n{name}")
    if values:
        axes.boxplot(values)
        axes.set_xticks(range(1, len(names) + 1), names, rotation=60, ha="right", fontsize=7)
    axes.axhline(0.0, color="black", linewidth=0.6, linestyle=":")
    axes.set_ylabel("applied BN weight per channel")
    axes.set_title(title)
    return figure


def _box_count(tables: dict[str, pd.DataFrame]) -> int:
    return sum(table["layer"].nunique() for table in tables.values())


def log_diagnostics(
    model: nn.Module,
    test: Evaluator,
    data: LongTailData,
    run_log: RunLog,
    step: int,
    title: str,
) -> dict[str, float]:
    """Measure the diagnostics on the test split and log them (rank 0); every rank calls it."""
    table = feature_strength(model, test, data)
    if not test.dist.is_main:
        return {}
    summary: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        if table is None:
            log.warning(
                "diagnostics: the classifier has no (classes, features) weight; no strength"
            )
        else:
            summary = strength_summary(table)
            run_log.log_text(table.to_csv(index=False, float_format="%.6g"), STRENGTH_CSV)
            run_log.log_metrics(summary, step=step)
            _log_figure(
                run_log, strength_figure({title: table}, title), scratch, "feature_strength"
            )
        weights = bn_weights(model)
        if len(weights):
            run_log.log_text(weights.to_csv(index=False, float_format="%.6g"), BN_CSV)
            _log_figure(run_log, bn_figure({title: weights}, title), scratch, "bn_weights")
    return summary


def _log_figure(run_log: RunLog, figure: Figure, scratch: str, name: str) -> None:
    path = Path(scratch) / f"{name}.png"
    figure.savefig(path, dpi=120)
    run_log.log_file(path, FOLDER)


def compare(
    strength: dict[str, list[pd.DataFrame]], weights: dict[str, list[pd.DataFrame]]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Figure]]:
    """Overlay the diagnostics of several runs, labelled (for example by method).

    Returns the per-class relative strength averaged over each label's runs (one column per
    label), the summaries per label (mean over runs), and the two comparison figures.
    """
    means = {
        label: pd.concat(tables)
        .groupby(["class", "train_count", "shot_group"], as_index=False)["relative_strength"]
        .mean()
        for label, tables in strength.items()
        if tables
    }
    per_class = None
    for label, table in means.items():
        column = table.rename(columns={"relative_strength": label})
        per_class = column if per_class is None else per_class.merge(column)
    summaries = pd.DataFrame(
        [
            {"label": label, "runs": len(tables)}
            | pd.DataFrame([strength_summary(t) for t in tables]).mean().to_dict()
            for label, tables in strength.items()
            if tables
        ]
    )
    first_weights = {label: tables[0] for label, tables in weights.items() if tables}
    figures = {
        "feature_strength": strength_figure(means, "relative feature strength per class"),
        "bn_weights": bn_figure(first_weights, "applied last-stage BN weights (first run)"),
    }
    return (per_class if per_class is not None else pd.DataFrame()), summaries, figures


def collect_tables(
    tracker: Tracker,
    experiments: list[str] | None = None,
    dataset: str | None = None,
    backbone: str | None = None,
) -> tuple[dict[str, list[pd.DataFrame]], dict[str, list[pd.DataFrame]]]:
    """The diagnostic tables of finished runs, labelled by method (and by data set, backbone
    and fingerprint where one method label covers several setups)."""
    from ltbench.leaderboard import collect

    runs, _ = collect(tracker, experiments)
    if runs.empty:
        return {}, {}
    if dataset:
        runs = runs[runs["tags.dataset"] == dataset]
    if backbone:
        runs = runs[runs["tags.backbone"] == backbone]
    setups = runs.groupby(["tags.method", "tags.dataset", "tags.backbone", "tags.fingerprint"])
    labels = {}
    for key, _ in setups:
        method, data_name, backbone_name, run_fingerprint = key
        shared = sum(other[0] == method for other in setups.groups)
        labels[key] = (
            method
            if shared == 1
            else f"{method} ({data_name}, {backbone_name}, {run_fingerprint[:8]})"
        )
    strength: dict[str, list[pd.DataFrame]] = {}
    weights: dict[str, list[pd.DataFrame]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for key, group in setups:
            for run_id in group["run_id"]:
                for path, tables in ((STRENGTH_CSV, strength), (BN_CSV, weights)):
                    if tracker.has_artifact(run_id, path):
                        local = tracker.download(run_id, path, scratch)
                        tables.setdefault(labels[key], []).append(pd.read_csv(local))
    return strength, weights


def write_comparison(
    tracker: Tracker,
    experiments: list[str] | None,
    out: Path,
    dataset: str | None = None,
    backbone: str | None = None,
) -> pd.DataFrame:
    """Write ``feature_strength.csv``, ``summary.csv`` and the two comparison plots to ``out``;
    return the summary (one row per label, means over its runs)."""
    strength, weights = collect_tables(tracker, experiments, dataset, backbone)
    if not strength:
        where = f"experiment(s) {', '.join(experiments)}" if experiments else "the store"
        raise LtbenchError(
            f"no finished run in {where} of {tracker.uri} has diagnostics"
            f"{' on ' + dataset if dataset else ''}; runs log them unless train.diagnostics=false"
        )
    per_class, summaries, figures = compare(strength, weights)
    out.mkdir(parents=True, exist_ok=True)
    per_class.to_csv(out / "feature_strength.csv", index=False, float_format="%.6g")
    summaries.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    for name, figure in figures.items():
        figure.savefig(out / f"{name}.png", dpi=120)
    return summaries
