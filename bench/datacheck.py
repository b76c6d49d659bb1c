"""``ltbench data check``: what a data set's root holds, and whether runs can use it.

The report lists the files the data set needs and their state (checksums, list sizes, missing
images), then loads the data set as a run would (accepting non-canonical files, to show
them) and gives the size of each split, the largest and smallest classes, the shot groups
and whether the data is canonical. When something is missing it says how to get it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ltbench.config import DataConfig, parse_overrides
from ltbench.data import DATASETS, LongTailData, options_label
from ltbench.errors import ConfigError, DataError
from ltbench.registry import resolve_options

SHOWN_CLASSES = 3


@dataclass
class CheckReport:
    """The text of a data check and whether a run with these settings could use the data."""

    lines: list[str] = field(default_factory=list)
    usable: bool = False

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def split_settings(pairs: list[str]) -> tuple[dict, DataConfig]:
    """``key=value`` pairs -> (data set options, data settings): ``data.download=true`` and
    ``data.allow_noncanonical=true`` set the data settings, any other key a data set option
    (``imbalance_ratio=50``)."""
    parsed = parse_overrides(pairs)
    settings = {}
    for key, value in (parsed.get("data") or {}).items():
        if key not in ("download", "allow_noncanonical"):
            raise ConfigError(
                f"data check takes data.download and data.allow_noncanonical, not data.{key} "
                "(give the root with --root)"
            )
        settings[key] = bool(value)
    options = {k: v for k, v in parsed.items() if k != "data"}
    return options, DataConfig(**settings)


def check(name: str, root: str | None, pairs: list[str] = ()) -> CheckReport:
    """Check data set ``name`` under ``root`` with options and data settings from ``pairs``."""
    options, settings = split_settings(list(pairs))
    plugin_cls = DATASETS.get(name)
    options = resolve_options("data set", name, plugin_cls.__init__, options)
    plugin = plugin_cls(**options)
    shown = options_label(options)
    report = CheckReport([f"{name}{f' ({shown})' if shown else ''}: {DATASETS.describe(name)}"])
    report.lines.append(f"root: {root if root is not None else '(not set)'}")

    inventory = plugin.inventory(root)
    if inventory:
        report.lines.append("files:")
        width = max(len(f.path) for f in inventory)
        for entry in inventory:
            detail = f"  {entry.detail}" if entry.detail else ""
            report.lines.append(f"  {entry.path:<{width}}  {entry.status:<8}{detail}".rstrip())

    try:
        data = plugin.load(root=root, download=settings.download, allow_noncanonical=True)
    except DataError as error:
        report.lines.append(f"cannot load: {error}")
        how = plugin.instructions(root)
        if how and how not in str(error):
            report.lines.append(f"to get it: {how}")
        return report

    report.lines += describe(data)
    if data.canonical:
        report.lines.append("canonical: yes, the files match the official release")
        report.usable = True
    else:
        report.usable = settings.allow_noncanonical
        report.lines.append(
            "canonical: NO, the files differ from the official release; runs need "
            "data.allow_noncanonical=true and are tagged data_canonical=false and marked † "
            "in the leaderboard"
        )
    if any(entry.status == "missing" for entry in inventory):
        report.lines.append(f"to get what is missing: {plugin.instructions(root)}")
    return report


def describe(data: LongTailData) -> list[str]:
    """Split sizes, the largest and smallest classes and the shot groups of loaded data."""
    counts = data.class_counts
    lines = ["splits:"]
    for split_name in ("train", "val", "test"):
        split = getattr(data, split_name)
        if split is None:
            lines.append(f"  {split_name:<5}  none")
            continue
        classes = int((torch.bincount(split.labels, minlength=data.num_classes) > 0).sum())
        lines.append(f"  {split_name:<5}  {len(split):>8,} images, {classes} classes")
    order = torch.argsort(counts, descending=True, stable=True).tolist()

    def named(classes: list[int]) -> str:
        return ", ".join(f"{data.class_names[c]} ({int(counts[c])})" for c in classes)

    lines.append(f"largest classes:  {named(order[:SHOWN_CLASSES])}")
    lines.append(f"smallest classes: {named(order[::-1][:SHOWN_CLASSES])}")
    smallest = max(int(counts.min()), 1)
    lines.append(f"imbalance ratio:  {int(counts.max()) / smallest:g}")
    lines.append(f"shot groups (many > {data.many_above}, few < {data.few_below} training images):")
    for group, members in data.shot_groups.items():
        if not members:
            lines.append(f"  {group:<6}  empty")
            continue
        images = int(counts[members].sum())
        lines.append(f"  {group:<6}  {len(members):>5} classes, {images:>8,} training images")
    return lines
