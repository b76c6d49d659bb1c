"""Accuracy over classes and shot groups, and the per-class table logged with each run."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ltbench.data import SHOT_GROUPS


@dataclass
class ClassTally:
    """Correct and total predictions per class, summed over every rank."""

    correct: torch.Tensor
    total: torch.Tensor

    @property
    def per_class_accuracy(self) -> torch.Tensor:
        """Accuracy of each class in [0, 1]; NaN for a class with no images."""
        return self.correct.double() / self.total.double()

    @property
    def count(self) -> int:
        return int(self.total.sum())


def summarize(tally: ClassTally, groups: dict[str, list[int]], prefix: str) -> dict[str, float]:
    """Top-1 accuracy over all images and the mean class accuracy of each non-empty shot group,
    in percent, plus the number of images counted. An empty group is left out, never 0."""
    per_class = tally.per_class_accuracy
    metrics = {
        f"{prefix}_acc": 100.0 * float(tally.correct.sum()) / max(tally.count, 1),
        f"{prefix}_count": float(tally.count),
    }
    for group in SHOT_GROUPS:
        members = [c for c in groups[group] if tally.total[c] > 0]
        if members:
            metrics[f"{prefix}_acc_{group}"] = 100.0 * float(per_class[members].mean())
    return metrics


def per_class_table(
    tally: ClassTally,
    class_counts: torch.Tensor,
    class_names: list[str],
    groups: dict[str, list[int]],
) -> pd.DataFrame:
    """One row per class: its training count, shot group and test accuracy."""
    group_of = {c: group for group, members in groups.items() for c in members}
    return pd.DataFrame(
        {
            "class": range(len(class_names)),
            "name": class_names,
            "train_count": class_counts.tolist(),
            "shot_group": [group_of[c] for c in range(len(class_names))],
            "test_count": tally.total.tolist(),
            "test_correct": tally.correct.tolist(),
            "test_accuracy": (100.0 * tally.per_class_accuracy).round(decimals=4).tolist(),
        }
    )
