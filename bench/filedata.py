"""Image-file splits and their DataLoader pipeline, for data sets too large to hold in memory.

A :class:`FileSplit` is a list of image files under a root with their labels. Its loader
decodes with torchvision in DataLoader worker processes (persistent across epochs, pinned
memory on CUDA), applies the recipe's transforms to uint8 tensors, and normalises on the
device. The method still chooses the sampler: the engine passes each epoch's sample order to
``Loader.batches``, and the loader only cuts it into batches.

Augmentation draws no hidden random state. Each image's transform uses a generator seeded with
(loader seed, epoch, position in the epoch's order), so the same epoch gives the same pixels
whatever the number of workers, and a run resumed at an epoch boundary is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

from ltbench.data import Loader, Split
from ltbench.errors import DataError

RATIO_RANGE = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ImageTransform:
    """The recipe's transform of one decoded uint8 image (C, H, W).

    Training: a random resized crop to ``size`` (area fraction in ``scale``, aspect ratio in
    3/4..4/3), an optional horizontal flip and colour jitter (brightness, contrast and
    saturation factors in [1 - j, 1 + j], applied in a random order). Test: resize the shorter
    side to ``resize``, then a centre crop to ``size``.
    """

    train: bool
    size: int
    resize: int
    scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    color_jitter: float = 0.0

    @classmethod
    def from_recipe(cls, recipe: Any, train: bool) -> ImageTransform:
        return cls(
            train=train,
            size=recipe.image_size,
            resize=recipe.test_resize,
            scale=tuple(recipe.crop_scale),
            flip=recipe.flip,
            color_jitter=recipe.color_jitter,
        )

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if not self.train:
            image = TF.resize(image, [self.resize], antialias=True)
            return TF.center_crop(image, [self.size, self.size])
        top, left, height, width = self.crop_box(image.shape[-2], image.shape[-1], rng)
        image = TF.resized_crop(image, top, left, height, width, [self.size] * 2, antialias=True)
        if self.flip and rng.random() < 0.5:
            image = TF.horizontal_flip(image)
        if self.color_jitter:
            image = self.jitter(image, rng)
        return image

    def crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, ...]:
        """(top, left, height, width) of a random crop with area fraction in ``scale`` and a
        log-uniform aspect ratio; after 10 failed draws, the largest centred crop whose ratio
        is within range."""
        area = height * width
        log_ratios = (math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(*log_ratios))
            crop_w = round(math.sqrt(target * ratio))
            crop_h = round(math.sqrt(target / ratio))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                return top, left, crop_h, crop_w
        ratio = width / height
        if ratio < RATIO_RANGE[0]:
            crop_w, crop_h = width, round(width / RATIO_RANGE[0])
        elif ratio > RATIO_RANGE[1]:
            crop_w, crop_h = round(height * RATIO_RANGE[1]), height
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def jitter(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        low, high = max(0.0, 1 - self.color_jitter), 1 + self.color_jitter
        adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
        for which in rng.permutation(len(adjust)):
            image = adjust[which](image, float(rng.uniform(low, high)))
        return image


@dataclass
class FileSplit(Split):
    """A split given by image files under ``root`` (relative paths) and their labels.

    ``lines`` are the 1-based line numbers of the files in ``source`` (the list they came
    from), so an unreadable image is reported where the user can find it.
    """

    root: Path
    paths: np.ndarray
    labels: torch.Tensor
    source: str = ""
    lines: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.paths = np.asarray(self.paths, dtype=np.bytes_)  # one buffer, safe to fork
        assert len(self.paths) == len(self.labels)

    def path(self, index: int) -> Path:
        return self.root / self.paths[index].decode()

    def where(self, index: int) -> str:
        line = (
            f" (line {int(self.lines[index])} of {self.source})" if self.lines is not None else ""
        )
        return f"{self.path(index)}{line}"

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
    ) -> FileLoader:
        return FileLoader(
            self,
            ImageTransform.from_recipe(recipe, train),
            device,
            mean,
            std,
            seed=seed,
            channels_last=channels_last,
            num_workers=num_workers,
        )


class _EpochBatches:
    """The batch sampler of a FileLoader: the current epoch's order cut into batches of
    (epoch, position, index) keys. The loader sets it before each epoch, so persistent
    workers keep running while the sample order changes."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.batch_size = 1
        self.epoch = 0

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for start in range(0, len(self.order), self.batch_size):
            chunk = self.order[start : start + self.batch_size]
            yield [(self.epoch, start + i, index) for i, index in enumerate(chunk)]

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)


class _Images(Dataset):
    """Decodes and transforms one image per key; errors travel back as text, not exceptions,
    so the main process can name the file plainly."""

    def __init__(self, split: FileSplit, transform: ImageTransform, seed: int) -> None:
        self.split = split
        self.transform = transform
        self.seed = seed % 2**63

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, str]:
        epoch, position, index = key
        label = int(self.split.labels[index])
        try:
            image = decode_image(read_file(str(self.split.path(index))), mode=ImageReadMode.RGB)
        except (OSError, RuntimeError, ValueError) as error:
            blank = torch.zeros(3, self.transform.size, self.transform.size, dtype=torch.uint8)
            return blank, label, f"{self.split.where(index)}: {error}"
        rng = np.random.default_rng([self.seed, epoch, position])
        return self.transform(image, rng), label, ""

    def __len__(self) -> int:
        return len(self.split)


def _collate(items: list[tuple[torch.Tensor, int, str]]) -> tuple:
    images, labels, errors = zip(*items, strict=True)
    return torch.stack(images), torch.tensor(labels), [e for e in errors if e]


class FileLoader(Loader):
    """Feeds a FileSplit through worker processes; normalises on the device."""

    def __init__(
        self,
        split: FileSplit,
        transform: ImageTransform,
        device: torch.device,
        mean: tuple,
        std: tuple,
        *,
        seed: int,
        channels_last: bool,
        num_workers: int,
    ) -> None:
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sampler = _EpochBatches()
        self.loader = DataLoader(
            _Images(split, transform, seed),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def batches(self, indices: torch.Tensor, batch_size: int, epoch: int = 0) -> Iterator[tuple]:
        self.sampler.order = indices.tolist()
        self.sampler.batch_size = batch_size
        self.sampler.epoch = epoch
        for images, labels, errors in self.loader:
            if errors:
                raise DataError(
                    f"cannot read image {errors[0]}"
                    + (f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else "")
                    + "; replace the file or remove its line from the list"
                )
            images = images.to(self.device, non_blocking=True).float()
            images = (images - self.mean) / self.std
            labels = labels.to(self.device, non_blocking=True)
            yield images.contiguous(memory_format=self.memory_format), labels
