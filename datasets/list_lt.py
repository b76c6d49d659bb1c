"""imagenet_lt, places_lt, inat2018: long-tailed data sets given by split lists.

Each split is a text file of ``relative/path label`` lines (the lists released with OLTR, Liu
et al., CVPR 2019, for ImageNet-LT and Places-LT, and with Decoupling, Kang et al., ICLR 2020,
for iNaturalist 2018); the paths are relative to the image root, ``data.root``, which must also
hold the list files. Every list's line count, class count and (for training) largest and
smallest class are checked against the published figures; a mismatch is refused unless
``data.allow_noncanonical=true``, which marks the data non-canonical. Each list's sha256 is
recorded in the provenance, so the run records exactly which lists it used.

Splits: ImageNet-LT and Places-LT have a train, a val and a test list; the val split is used to
choose post-hoc settings (tau-norm). iNaturalist 2018 has no test list: its official val list
serves as the test split, as in every paper, and ``inat2018`` has no val split. Holding images
out of its training list would change the benchmark (its smallest classes have 2 images), and
choosing on its test split breaks the protocol, so a method that needs a val split refuses
to run on it rather than choose on test.

Missing images are checked up front; unreadable ones at first touch. Whether every listed
file exists is checked when the data set loads, by listing each image folder once (a few
seconds for iNaturalist's 460,000 files, even on network storage, where a stat per file would
be slow), and all missing files are reported together before any training starts, which is
the usual failure (an archive partly extracted, the wrong root). Decoding every image up front
would read the whole data set (hundreds of GB for iNaturalist) before each run, so a corrupt
or unreadable image fails when it is first decoded, with its path and its line in the list.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltbench.data import DATASETS, DataFile, DatasetPlugin, LongTailData
from ltbench.errors import DataError
from ltbench.filedata import FileSplit

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ImageNet-LT, ResNeXt-50 / ResNet-50 (Kang et al. 2020): 90 epochs, cosine from 0.2
IMAGENET_LT_RECIPE = {
    "epochs": 90,
    "batch_size": 512,
    "lr": 0.2,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "warmup_epochs": 0,
    "lr_steps": [],
    "lr_step_factors": [],
    "crop_padding": 0,
    "flip": True,
    "image_size": 224,
    "test_resize": 256,
    "crop_scale": [0.08, 1.0],
    "color_jitter": 0.4,
}
#: iNaturalist 2018: the ImageNet-LT recipe with weight decay 1e-4 and no colour jitter
INAT_RECIPE = IMAGENET_LT_RECIPE | {"weight_decay": 1e-4, "color_jitter": 0.0}


@dataclass(frozen=True)
class ListSpec:
    """The published shape of a list-file data set: its lists and their sizes."""

    title: str
    num_classes: int
    lists: dict[str, tuple[str, int]]  # split -> (list file name, number of lines)
    largest: int
    smallest: int
    lists_source: str
    images_source: str

    def how_to_get(self, root: str | None) -> str:
        where = root or "DIR"
        files = ", ".join(name for name, _ in self.lists.values())
        return (
            f"put the {self.title} split lists ({files}; {self.lists_source}) in {where}, and "
            f"the images they name under {where} ({self.images_source}); the list paths are "
            f"relative to {where}"
        )


IMAGENET_LT = ListSpec(
    title="ImageNet-LT",
    num_classes=1000,
    lists={
        "train": ("ImageNet_LT_train.txt", 115_846),
        "val": ("ImageNet_LT_val.txt", 20_000),
        "test": ("ImageNet_LT_test.txt", 50_000),
    },
    largest=1280,
    smallest=5,
    lists_source="from the OLTR release, github.com/zhmiao/OpenLongTailRecognition-OLTR",
    images_source="ILSVRC2012 train and val from image-net.org, val sorted into class folders "
    "as val/<wnid>/",
)

PLACES_LT = ListSpec(
    title="Places-LT",
    num_classes=365,
    lists={
        "train": ("Places_LT_train.txt", 62_500),
        "val": ("Places_LT_val.txt", 7_300),
        "test": ("Places_LT_test.txt", 36_500),
    },
    largest=4980,
    smallest=5,
    lists_source="from the OLTR release, github.com/zhmiao/OpenLongTailRecognition-OLTR",
    images_source="Places365-Standard from places2.csail.mit.edu, laid out as the lists name",
)

INAT2018 = ListSpec(
    title="iNaturalist 2018",
    num_classes=8142,
    lists={
        "train": ("iNaturalist18_train.txt", 437_513),
        "test": ("iNaturalist18_val.txt", 24_426),
    },
    largest=1000,
    smallest=2,
    lists_source="from the Decoupling release, github.com/facebookresearch/classifier-balancing",
    images_source="the iNaturalist 2018 competition images (train_val2018/) from "
    "github.com/visipedia/inat_comp",
)


@dataclass
class ImageList:
    """A parsed split list: relative paths, labels, their line numbers, the file's sha256."""

    file: Path
    paths: list[str]
    labels: np.ndarray
    lines: np.ndarray
    sha256: str

    def __len__(self) -> int:
        return len(self.paths)


def parse_list(file: Path) -> ImageList:
    """Read a ``relative/path label`` list; a malformed line is an error naming its number."""
    content = file.read_bytes()
    paths, labels, lines = [], [], []
    for number, raw in enumerate(content.decode("utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(
                f"line {number} of {file} is {raw[:80]!r}; every line must be "
                "'relative/path label' with an integer label"
            )
        paths.append(parts[0])
        labels.append(int(parts[1]))
        lines.append(number)
    return ImageList(
        file,
        paths,
        np.asarray(labels, dtype=np.int64),
        np.asarray(lines, dtype=np.int64),
        hashlib.sha256(content).hexdigest(),
    )


def missing_images(root: Path, paths: Iterable[str]) -> list[int]:
    """Positions of the paths with no file under ``root``; each folder is listed once."""
    listings: dict[str, set[str] | None] = {}
    missing = []
    for position, path in enumerate(paths):
        folder, _, name = path.rpartition("/")
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(root / folder))
            except OSError:
                listings[folder] = None
        found = listings[folder]
        if found is None or name not in found:
            missing.append(position)
    return missing


def class_names(train: ImageList, num_classes: int) -> list[str]:
    """Each class's name: the folder of its first training image, without the split folder
    (``train/n01440764/x.JPEG`` -> ``n01440764``)."""
    names = [str(c) for c in range(num_classes)]
    seen: set[int] = set()
    for path, label in zip(train.paths, train.labels.tolist(), strict=True):
        if label not in seen:
            seen.add(label)
            folders = path.split("/")[:-1]
            names[label] = "/".join(folders[1:] if len(folders) > 1 else folders) or str(label)
    return names


class ListLT(DatasetPlugin):
    """A long-tailed data set from split lists (base of imagenet_lt, places_lt, inat2018)."""

    name: str
    spec: ListSpec
    model: str
    recipe: dict[str, Any]

    def defaults(self) -> dict[str, Any]:
        return {"model": {"name": self.model}, "recipe": dict(self.recipe)}

    def instructions(self, root: str | None) -> str:
        return self.spec.how_to_get(root)

    def problems(self, split: str, image_list: ImageList) -> list[str]:
        """How a list differs from the published figures (empty when it matches)."""
        spec, (file, lines) = self.spec, self.spec.lists[split]
        found = []
        if len(image_list) != lines:
            found.append(f"{file} has {len(image_list)} lines, the release has {lines}")
        labels = image_list.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            found.append(f"{file} has labels outside 0..{spec.num_classes - 1}")
            return found
        counts = np.bincount(labels, minlength=spec.num_classes)
        classes = int((counts > 0).sum())
        if classes != spec.num_classes:
            found.append(f"{file} has {classes} classes, the release has {spec.num_classes}")
        if split == "train" and len(labels):
            present = counts[counts > 0]
            if (present.max(), present.min()) != (spec.largest, spec.smallest):
                found.append(
                    f"{file}: largest / smallest class {present.max()} / {present.min()}, "
                    f"the release has {spec.largest} / {spec.smallest}"
                )
        return found

    def inventory(self, root: str | None) -> list[DataFile]:
        if root is None:
            return [DataFile(name, "missing", "data.root is not set") for name, _ in self._files()]
        found = []
        for split in self.spec.lists:
            file = self.spec.lists[split][0]
            path = Path(root) / file
            if not path.is_file():
                found.append(DataFile(file, "missing", f"the {split} list"))
                continue
            try:
                image_list = parse_list(path)
            except DataError as error:
                found.append(DataFile(file, "differs", str(error)))
                continue
            problems = self.problems(split, image_list)
            detail = f"{len(image_list):,} lines, sha256 {image_list.sha256[:16]}"
            found.append(
                DataFile(file, "differs" if problems else "ok", "; ".join([detail, *problems]))
            )
            missing = missing_images(Path(root), image_list.paths)
            example = f", e.g. {image_list.paths[missing[0]]}" if missing else ""
            found.append(
                DataFile(
                    f"images of {file}",
                    "missing" if missing else "ok",
                    f"{len(missing):,} of {len(image_list):,} missing{example}",
                )
            )
        return found

    def _files(self) -> list[tuple[str, int]]:
        return list(self.spec.lists.values())

    def load(self, *, root: str | None, download: bool, allow_noncanonical: bool) -> LongTailData:
        base = self._root(root, download)
        lists = {split: self._read(base, split) for split in self.spec.lists}
        problems = [
            p for split, image_list in lists.items() for p in self.problems(split, image_list)
        ]
        if problems and not allow_noncanonical:
            raise DataError(
                f"the {self.spec.title} lists in {base} differ from the release: "
                f"{'; '.join(problems)}. Use the released lists ({self.spec.lists_source}), or "
                "set data.allow_noncanonical=true to run on these, marked non-canonical"
            )
        for image_list in lists.values():
            self._check_images(base, image_list)

        splits = {split: self._split(base, image_list) for split, image_list in lists.items()}
        return LongTailData(
            name=self.name,
            class_names=class_names(lists["train"], self.spec.num_classes),
            train=splits["train"],
            val=splits.get("val"),
            test=splits["test"],
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            canonical=not problems,
            provenance={
                "source": f"{self.spec.title} split lists",
                **{f"sha256.{il.file.name}": il.sha256 for il in lists.values()},
            },
        )

    def _root(self, root: str | None, download: bool) -> Path:
        if root is None:
            raise DataError(f"data.root is not set: {self.spec.how_to_get(None)}")
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"data.root {root} does not exist; {self.spec.how_to_get(root)}")
        missing = [name for name, _ in self._files() if not (base / name).is_file()]
        if missing:
            cannot = (
                f"; {self.spec.title} cannot be downloaded automatically (data.download=true)"
                if download
                else ""
            )
            raise DataError(
                f"{root} lacks the list file(s) {', '.join(missing)}{cannot}; "
                f"{self.spec.how_to_get(root)}"
            )
        return base

    def _read(self, base: Path, split: str) -> ImageList:
        return parse_list(base / self.spec.lists[split][0])

    def _check_images(self, base: Path, image_list: ImageList) -> None:
        missing = missing_images(base, image_list.paths)
        if not missing:
            return
        shown = ", ".join(
            f"{image_list.paths[m]} (line {image_list.lines[m]})" for m in missing[:3]
        )
        raise DataError(
            f"{len(missing)} of the {len(image_list)} images listed in {image_list.file.name} "
            f"are missing under {base}: {shown}{', ...' if len(missing) > 3 else ''}. "
            f"Get them: {self.spec.images_source}"
        )

    def _split(self, base: Path, image_list: ImageList) -> FileSplit:
        return FileSplit(
            root=base,
            paths=np.asarray(image_list.paths, dtype=np.bytes_),
            labels=torch.from_numpy(image_list.labels),
            source=image_list.file.name,
            lines=image_list.lines,
        )


@DATASETS.register("imagenet_lt")
class ImageNetLT(ListLT):
    """ImageNet-LT (Liu et al. 2019): 1000 classes, 1280 to 5 training images, OLTR lists."""

    name = "imagenet_lt"
    spec = IMAGENET_LT
    model = "timm/resnext50_32x4d"
    recipe = IMAGENET_LT_RECIPE


@DATASETS.register("places_lt")
class PlacesLT(ListLT):
    """Places-LT (Liu et al. 2019): 365 classes, 4980 to 5 training images, OLTR lists.

    NOTE: the published Places-LT protocol fine-tunes an ImageNet-pretrained ResNet-152; the
    default here trains a ResNet-50 from scratch with the ImageNet-LT recipe, so its numbers
    are not comparable with published ones.
    """

    name = "places_lt"
    spec = PLACES_LT
    model = "timm/resnet50"
    recipe = IMAGENET_LT_RECIPE

    def load(self, *, root: str | None, download: bool, allow_noncanonical: bool) -> LongTailData:
        log.warning(
            "places_lt trains from scratch; published Places-LT numbers fine-tune an "
            "ImageNet-pretrained ResNet-152, so they are not comparable"
        )
        return super().load(root=root, download=download, allow_noncanonical=allow_noncanonical)


@DATASETS.register("inat2018")
class INat2018(ListLT):
    """iNaturalist 2018: 8142 classes, 1000 to 2 training images; its val list is the test."""

    name = "inat2018"
    spec = INAT2018
    model = "timm/resnet50"
    recipe = INAT_RECIPE
