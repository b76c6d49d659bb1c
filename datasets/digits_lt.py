"""digits_lt: scikit-learn's digits made long-tailed, the embedded offline data set.

scikit-learn ships 1,797 real scanned handwritten digits (8x8, 16 grey levels, about 180 per
class). The split is fixed and seeded: for each class, after a shuffle with ``split_seed``,
the first 40 images are the balanced test set, the next 10 the balanced val split, and the
first ``n_i`` of the rest the training set, with the exponential profile
``n_i = int(120 * (1 / imbalance_ratio) ** (i / 9))`` (class 0 largest).

Shot groups are scaled to its size: many = more than 50 training images, medium = 20 to 50,
few = fewer than 20. At the default ratio 50 the counts are 120 77 50 32 21 13 8 5 3 2:
2 many-shot, 3 medium-shot and 5 few-shot classes (at ratio 10: 4, 4 and 2).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ltbench.data import DATASETS, DatasetPlugin, LongTailData, TensorSplit, exponential_profile
from ltbench.errors import ConfigError, DataError

N_MAX = 120
TEST_PER_CLASS = 40
VAL_PER_CLASS = 10
#: sha256 of the images (as uint8, 0-255) and labels scikit-learn ships; any other is not canonical
DIGITS_SHA256 = "0b7e9c3202d7bcd255d6a19a238d3743bf5e320ba74812a6679958a017c55382"


@DATASETS.register("digits_lt")
class DigitsLT(DatasetPlugin):
    """scikit-learn's real scanned digits, long-tailed (embedded, offline, seconds per run)."""

    def __init__(self, imbalance_ratio: float = 50.0, split_seed: int = 0) -> None:
        if not 1 <= imbalance_ratio <= N_MAX:
            raise ConfigError(
                f"digits_lt imbalance_ratio must be between 1 and {N_MAX}, not {imbalance_ratio}"
            )
        self.imbalance_ratio = imbalance_ratio
        self.split_seed = split_seed

    def defaults(self) -> dict[str, Any]:
        return {
            "model": {"name": "resnet8"},
            "recipe": {
                "epochs": 30,
                "batch_size": 64,
                "lr": 0.05,
                "weight_decay": 5e-4,
                "schedule": "step",
                "warmup_epochs": 2,
                "crop_padding": 1,
                "flip": False,
            },
        }

    def load(self, *, root: str | None, download: bool, allow_noncanonical: bool) -> LongTailData:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * 255 / 16).astype(np.uint8)
        labels = digits.target.astype(np.int64)
        digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        canonical = digest == DIGITS_SHA256
        if not canonical and not allow_noncanonical:
            raise DataError(
                "scikit-learn's digits differ from the release ltbench pins "
                f"(sha256 {digest}); reinstall scikit-learn, or set data.allow_noncanonical=true "
                "to run on them marked as non-canonical"
            )

        counts = exponential_profile(N_MAX, 10, self.imbalance_ratio)
        rng = np.random.RandomState(self.split_seed)
        chosen: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
        for label, count in enumerate(counts):
            members = np.flatnonzero(labels == label)
            rng.shuffle(members)
            chosen["test"].append(members[:TEST_PER_CLASS])
            chosen["val"].append(members[TEST_PER_CLASS : TEST_PER_CLASS + VAL_PER_CLASS])
            chosen["train"].append(members[TEST_PER_CLASS + VAL_PER_CLASS :][:count])

        def split(name: str) -> TensorSplit:
            index = np.concatenate(chosen[name])
            return TensorSplit(
                torch.from_numpy(images[index]).unsqueeze(1), torch.from_numpy(labels[index])
            )

        return LongTailData(
            name="digits_lt",
            class_names=[str(d) for d in range(10)],
            train=split("train"),
            val=split("val"),
            test=split("test"),
            mean=(0.3053,),
            std=(0.3759,),
            in_chans=1,
            many_above=50,
            few_below=20,
            canonical=canonical,
            provenance={"source": "sklearn.datasets.load_digits", "sha256": digest},
        )
