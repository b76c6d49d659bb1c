"""The embedded data set: its counts, shot groups and fixed, balanced, disjoint splits."""

from __future__ import annotations

import pytest
import torch

from ltbench.data import DATASETS, exponential_profile, shot_groups
from ltbench.errors import ConfigError


def load(**options):
    return DATASETS.get("digits_lt")(**options).load(
        root=None, download=False, allow_noncanonical=False
    )


def test_default_counts_and_shot_groups():
    data = load()
    assert data.class_counts.tolist() == [120, 77, 50, 32, 21, 13, 8, 5, 3, 2]
    assert data.shot_groups == {"many": [0, 1], "medium": [2, 3, 4], "few": [5, 6, 7, 8, 9]}
    assert data.canonical and data.identity == "canonical"
    assert data.in_chans == 1 and data.train.images.shape[1:] == (1, 8, 8)


def test_imbalance_ratio_is_configurable():
    data = load(imbalance_ratio=10)
    assert data.class_counts.tolist() == [120, 92, 71, 55, 43, 33, 25, 20, 15, 12]
    assert [len(g) for g in data.shot_groups.values()] == [4, 4, 2]
    assert load(imbalance_ratio=1).class_counts.tolist() == [120] * 10


def test_test_and_val_are_balanced_and_splits_disjoint():
    data = load()
    assert torch.bincount(data.test.labels).tolist() == [40] * 10
    assert torch.bincount(data.val.labels).tolist() == [10] * 10
    rows = {
        name: {
            tuple(img.flatten().tolist()) + (int(lab),)
            for img, lab in zip(split.images, split.labels, strict=True)
        }
        for name, split in [("train", data.train), ("val", data.val), ("test", data.test)]
    }
    # NOTE: digits has a few duplicate images, so compare a tolerance, not zero.
    assert len(rows["train"] & rows["test"]) <= 2 and len(rows["train"] & rows["val"]) <= 2


def test_split_is_fixed_by_its_seed():
    assert torch.equal(load().test.images, load().test.images)
    assert not torch.equal(load().test.images, load(split_seed=1).test.images)


def test_bad_imbalance_ratio():
    with pytest.raises(ConfigError, match="between 1 and 120"):
        DATASETS.get("digits_lt")(imbalance_ratio=0.5)


def test_profile_and_groups_match_the_cifar_facts():
    counts = exponential_profile(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    groups = shot_groups(torch.tensor(counts))
    assert (len(groups["many"]), len(groups["medium"]), groups["few"]) == (8, 2, [])
    assert sum(exponential_profile(500, 100, 100)) == 10847
