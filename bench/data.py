"""Data set plugins, their splits, shot groups, sampling, and the in-memory tensor pipeline."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ltbench.errors import PluginError
from ltbench.method import ClassSampling
from ltbench.registry import Registry, check_options

SHOT_GROUPS = ("many", "medium", "few")


class Split:
    """A split of a data set: labels plus a way to feed its images to the training device."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def loader(
        self,
        *,
        train: bool,
        recipe: Any,
        mean: tuple,
        std: tuple,
        device: torch.device,
        seed: int,
        channels_last: bool = False,
        num_workers: int = 0,
    ) -> Loader:
        """A loader for this split; ``train`` turns on the recipe's augmentation."""
        raise NotImplementedError


class Loader:
    """Feeds batches of a split: ``batches(indices, batch_size, epoch)`` yields normalised
    (images, labels) on the device. Augmentation randomness derives from the loader's seed and
    ``epoch`` alone, so a run resumed at an epoch boundary draws exactly what it would have."""

    def batches(self, indices: torch.Tensor, batch_size: int, epoch: int = 0) -> Iterator[tuple]:
        raise NotImplementedError


@dataclass
class TensorSplit(Split):
    """A small split held whole in memory as uint8 images (N, C, H, W) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4
        assert len(self.images) == len(self.labels)

    def loader(
        self,
        *,
        train: bool,
        recipe: Any,
        mean: tuple,
        std: tuple,
        device: torch.device,
        seed: int,
        channels_last: bool = False,
        num_workers: int = 0,
    ) -> TensorLoader:
        return TensorLoader(
            self,
            device,
            mean,
            std,
            crop_padding=recipe.crop_padding if train else 0,
            flip=recipe.flip if train else False,
            channels_last=channels_last,
            seed=seed,
        )


class TensorLoader(Loader):
    """Keeps a TensorSplit on the device and augments whole batches there.

    Random crop with zero padding and horizontal flip are done with tensor indexing over the
    batch, so there is no per-image Python work and no worker process.
    """

    def __init__(
        self,
        split: TensorSplit,
        device: torch.device,
        mean: tuple,
        std: tuple,
        *,
        crop_padding: int,
        flip: bool,
        channels_last: bool,
        seed: int,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.crop_padding = crop_padding
        self.flip = flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.seed = seed
        self.generator = torch.Generator(device=device)

    def batches(self, indices: torch.Tensor, batch_size: int, epoch: int = 0) -> Iterator[tuple]:
        self.generator.manual_seed(self.seed * 100_003 + epoch)
        indices = indices.to(self.device)
        for start in range(0, len(indices), batch_size):
            chosen = indices[start : start + batch_size]
            images = self.augment(self.images[chosen])
            images = (images.float().div_(255) - self.mean) / self.std
            yield images.contiguous(memory_format=self.memory_format), self.labels[chosen]

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Random crop with zero padding and horizontal flip as one gather over the batch.

        Each output pixel's source in the padded image is computed (the crop's shift, the flip
        mirroring the column), so the whole batch moves in a single indexed copy.
        """
        batch, channels, height, width = images.shape
        pad = self.crop_padding
        if not pad and not self.flip:
            return images
        padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
        shifts = (
            torch.randint(0, 2 * pad + 1, (2, batch), device=self.device, generator=self.generator)
            if pad
            else torch.zeros(2, batch, dtype=torch.int64, device=self.device)
        )
        cols = torch.arange(width, device=self.device).expand(batch, width)
        if self.flip:
            flipped = torch.rand(batch, device=self.device, generator=self.generator) < 0.5
            cols = torch.where(flipped[:, None], width - 1 - cols, cols)
        cols = cols + shifts[1, :, None]
        rows = torch.arange(height, device=self.device) + shifts[0, :, None]
        source = rows[:, :, None] * (width + 2 * pad) + cols[:, None, :]
        source = source.view(batch, 1, height * width).expand(batch, channels, height * width)
        flat = padded.reshape(batch, channels, -1)
        return flat.gather(2, source).view(batch, channels, height, width)


@dataclass
class LongTailData:
    """A loaded long-tailed data set: its splits, classes, shot groups and provenance.

    Shot groups follow the literature: many = more than ``many_above`` training images,
    few = fewer than ``few_below``, medium = the rest. ``canonical`` is False when the files
    differ from the official release; ``provenance`` records what identifies the data
    (checksums, list hashes) and is logged with every run.
    """

    name: str
    class_names: list[str]
    train: Split
    test: Split
    val: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3
    many_above: int = 100
    few_below: int = 20
    canonical: bool = True
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """``canonical``, or a hash of the provenance of files that differ from the release."""
        if self.canonical:
            return "canonical"
        text = json.dumps(self.provenance, sort_keys=True)
        return "noncanonical-" + hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.train.labels, minlength=self.num_classes)

    @property
    def shot_groups(self) -> dict[str, list[int]]:
        return shot_groups(self.class_counts, self.many_above, self.few_below)


def shot_groups(
    class_counts: torch.Tensor, many_above: int = 100, few_below: int = 20
) -> dict[str, list[int]]:
    """Class ids of the many / medium / few-shot groups (a group may be empty)."""
    counts = class_counts.tolist()
    return {
        "many": [c for c, n in enumerate(counts) if n > many_above],
        "medium": [c for c, n in enumerate(counts) if few_below <= n <= many_above],
        "few": [c for c, n in enumerate(counts) if n < few_below],
    }


def exponential_profile(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class counts ``int(n_max * (1 / rho) ** (i / (C - 1)))``, the standard LT profile."""
    return [
        int(n_max * (1 / imbalance_ratio) ** (i / (num_classes - 1))) for i in range(num_classes)
    ]


def epoch_indices(
    labels: torch.Tensor, num_classes: int, sampling: ClassSampling | None, epoch: int, seed: int
) -> torch.Tensor:
    """The training sample order of one epoch, identical on every rank.

    Without a class sampling this is a seeded permutation. With one, ``len(labels)`` draws
    with replacement where each class is drawn with probability ``sampling(epoch)[c]`` and
    instances within a class uniformly.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if sampling is None:
        return torch.randperm(len(labels), generator=generator)
    class_probs = torch.as_tensor(sampling(epoch), dtype=torch.float64)
    counts = torch.bincount(labels, minlength=num_classes).double()
    if class_probs.shape != (num_classes,) or (class_probs < 0).any():
        raise ValueError(f"class sampling must give {num_classes} non-negative probabilities")
    weights = (class_probs / counts.clamp(min=1))[labels]
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator)


@dataclass
class DataFile:
    """A file or folder a data set needs under its root, as ``ltbench data check`` found it.

    ``status`` is ``ok`` (present and as released), ``differs`` (present, not the release),
    ``missing`` or ``present`` (there, with nothing to compare it against).
    """

    path: str
    status: str
    detail: str = ""


class DatasetPlugin:
    """Base class of data set plugins; the contract is in :class:`DatasetRegistry`."""

    def defaults(self) -> dict[str, Any]:
        """Config layer this data set brings: its default backbone and recipe."""
        return {}

    def inventory(self, root: str | None) -> list[DataFile]:
        """The files this data set needs under ``root`` and their state (none by default)."""
        return []

    def instructions(self, root: str | None) -> str:
        """How to get this data set's files into ``root`` ("" when it needs none)."""
        return ""

    def load(self, *, root: str | None, download: bool, allow_noncanonical: bool) -> LongTailData:
        raise NotImplementedError


class DatasetRegistry(Registry):
    """Data set plugins.

    Contract. A data set plugin is a subclass of :class:`DatasetPlugin` whose docstring's first
    line says what it is. Its options (imbalance ratio, split seed, ...) are keyword arguments
    of ``__init__``, typed and with defaults. It implements:

    ``defaults()``
        A config layer with its default backbone and recipe, e.g.
        ``{"model": {"name": "resnet32"}, "recipe": {"epochs": 200, ...}}``.
    ``load(root=, download=, allow_noncanonical=)``
        Build the splits and return a :class:`LongTailData`: train / val / test splits,
        class names, normalisation, shot-group thresholds, whether the files are the canonical
        release and their provenance. Missing or wrong files raise DataError saying what to
        fetch and where; files that differ from the official release are refused unless
        ``allow_noncanonical``, and are then marked ``canonical=False``.

    Optionally, for ``ltbench data check``: ``inventory(root)`` lists the needed files with
    their state (:class:`DataFile`), and ``instructions(root)`` says how to get them.
    """

    kind = "data set"
    group = "ltbench.datasets"
    builtin = "ltbench.datasets"

    def check(self, name: str, plugin: Any) -> None:
        if not (inspect.isclass(plugin) and issubclass(plugin, DatasetPlugin)):
            raise PluginError(f"data set {name!r} must subclass ltbench.data.DatasetPlugin")
        if not (plugin.__doc__ or "").strip():
            raise PluginError(f"data set {name!r} needs a docstring saying what it is")
        if plugin.load is DatasetPlugin.load:
            raise PluginError(f"data set {name!r} must implement load()")
        check_options("data set", name, plugin.__init__)


DATASETS = DatasetRegistry()


def options_label(options: dict[str, Any]) -> str:
    """A data set's options as a short label, ``imbalance_ratio=100, split_seed=0``."""
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()
    )
