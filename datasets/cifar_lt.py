"""cifar10_lt and cifar100_lt: long-tailed CIFAR as every paper since LDAM-DRW builds it.

Construction (Cao et al., NeurIPS 2019, and every later paper): from the official training
set, class ``i`` keeps ``n_i = int(n_max * (1 / rho) ** (i / (C - 1)))`` images (n_max 5000
for CIFAR-10, 500 for CIFAR-100; class order unchanged). The random state is seeded with 0
once; then, for each class in label order, that class's indices in the official training set
are shuffled with the legacy NumPy shuffle and the first ``n_i`` kept. ltbench draws from its
own ``RandomState(0)``, the same generator and stream as ``np.random.seed(0)`` followed by
``np.random.shuffle``, without touching NumPy's global state. The test split is the whole
balanced official test set.

Val split (ltbench's, used to choose post-hoc settings, never to train): 20 images per class,
drawn with a fixed seed from the official training images the long-tailed subset left out,
so neither the training subset nor the test set changes. The head class keeps every one of
its training images (``n_0 = n_max``), and at small ratios a few more classes keep nearly
all, so a class with fewer than 20 left-out images is topped up from its own training
images; the overlap is reported at load time and recorded in the provenance.

Files: the official python-pickle release (``cifar-10-batches-py`` / ``cifar-100-python``)
under ``data.root``. Their md5 checksums are compared with the official release before any
file is unpickled; a mismatch is refused unless ``data.allow_noncanonical=true``, and the data
is then marked non-canonical with the checksums found in its provenance. NOTE: unpickling
runs code from the file, so only let ltbench read non-canonical files you trust.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltbench.data import (
    DATASETS,
    DataFile,
    DatasetPlugin,
    LongTailData,
    TensorSplit,
    exponential_profile,
)
from ltbench.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: the published normalisation of the CIFAR-LT recipe (DESIGN.md), used for both data sets
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
VAL_PER_CLASS = 20
VAL_SEED = 0
CANONICAL_SEED = 0

#: CIFAR-LT, ResNet-32, as published (LDAM-DRW); the lr rule scales with recipe.epochs
CIFAR_LT_RECIPE = {
    "epochs": 200,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 2e-4,
    "schedule": "step",
    "warmup_epochs": None,
    "lr_steps": [0.8, 0.9],
    "lr_step_factors": [0.01, 0.0001],
    "crop_padding": 4,
    "flip": True,
}


@dataclass(frozen=True)
class CifarRelease:
    """The official python release of one CIFAR data set: its files and their md5 sums."""

    title: str
    folder: str
    url: str
    archive: str
    archive_md5: str
    train_files: dict[str, str]
    test_files: dict[str, str]
    meta_file: tuple[str, str]
    label_key: str
    names_key: str
    num_classes: int
    n_max: int
    test_per_class: int

    @property
    def files(self) -> dict[str, str]:
        """Every file of the release and its md5, training files first."""
        return {**self.train_files, **self.test_files, self.meta_file[0]: self.meta_file[1]}

    def how_to_get(self, root: str | None) -> str:
        where = root or "DIR"
        return (
            f"download {self.url} (md5 {self.archive_md5}) and extract it in {where}, so that "
            f"{Path(where) / self.folder} holds {', '.join(self.files)}; or set "
            f"data.download=true with data.root={where} where the internet is reachable"
        )


# The md5 sums published with the official release (the same ones torchvision checks).
CIFAR10 = CifarRelease(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive="cifar-10-python.tar.gz",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    train_files={
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    },
    test_files={"test_batch": "40351d587109b95175f43aff81a1287e"},
    meta_file=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    n_max=5000,
    test_per_class=1000,
)

CIFAR100 = CifarRelease(
    title="CIFAR-100",
    folder="cifar-100-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive="cifar-100-python.tar.gz",
    archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files={"train": "16019d7e3df5f24257cddd939b257f8d"},
    test_files={"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
    meta_file=("meta", "7973b15100ade9c7d40fb424638fde48"),
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    n_max=500,
    test_per_class=100,
)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_indices(labels: np.ndarray, counts: list[int], seed: int = CANONICAL_SEED) -> list:
    """Per class, in label order, the indices of the training images the LT subset keeps.

    One ``RandomState(seed)`` shuffles each class's indices (ascending, as ``np.where`` gives
    them) in turn and the first ``counts[c]`` are kept: the canonical LDAM-DRW construction.
    """
    rng = np.random.RandomState(seed)
    kept = []
    for label, count in enumerate(counts):
        members = np.where(labels == label)[0]
        rng.shuffle(members)
        kept.append(members[:count])
    return kept


def val_indices(
    labels: np.ndarray, kept: list, per_class: int = VAL_PER_CLASS, seed: int = VAL_SEED
) -> tuple[np.ndarray, dict[int, int]]:
    """A balanced, seeded val sample: ``per_class`` images of each class from the training
    images the LT subset left out, topped up from the class's kept images when too few were
    left out. Returns the indices and, per topped-up class, how many overlap training."""
    rng = np.random.default_rng(seed)
    chosen, overlap = [], {}
    for label, train_members in enumerate(kept):
        left_out = np.setdiff1d(np.where(labels == label)[0], train_members)
        take = rng.permutation(left_out)[:per_class]
        if len(take) < per_class:
            extra = rng.permutation(np.sort(train_members))[: per_class - len(take)]
            overlap[label] = len(extra)
            take = np.concatenate([take, extra])
        chosen.append(take)
    return np.concatenate(chosen), overlap


class CifarLT(DatasetPlugin):
    """Long-tailed CIFAR (base of cifar10_lt and cifar100_lt)."""

    name: str
    release: CifarRelease

    def __init__(self, imbalance_ratio: float = 100.0) -> None:
        if not 1 <= imbalance_ratio <= self.release.n_max:
            raise ConfigError(
                f"{self.release.title}-LT imbalance_ratio must be between 1 and "
                f"{self.release.n_max} (the largest class over the smallest), not {imbalance_ratio}"
            )
        self.imbalance_ratio = imbalance_ratio

    @property
    def class_counts(self) -> list[int]:
        return exponential_profile(
            self.release.n_max, self.release.num_classes, self.imbalance_ratio
        )

    def defaults(self) -> dict[str, Any]:
        return {"model": {"name": "resnet32"}, "recipe": dict(CIFAR_LT_RECIPE)}

    def instructions(self, root: str | None) -> str:
        return self.release.how_to_get(root)

    def inventory(self, root: str | None) -> list[DataFile]:
        if root is None:
            return [DataFile(self.release.folder, "missing", "data.root is not set")]
        folder = Path(root) / self.release.folder
        found = []
        for name, expected in self.release.files.items():
            path = folder / name
            if not path.is_file():
                found.append(DataFile(f"{self.release.folder}/{name}", "missing"))
                continue
            actual = md5sum(path)
            status = "ok" if actual == expected else "differs"
            detail = f"md5 {actual}" + ("" if status == "ok" else f", release has {expected}")
            found.append(DataFile(f"{self.release.folder}/{name}", status, detail))
        return found

    def load(self, *, root: str | None, download: bool, allow_noncanonical: bool) -> LongTailData:
        folder = self._folder(root, download)
        checksums = {name: md5sum(folder / name) for name in self.release.files}
        differing = [n for n, md5 in checksums.items() if md5 != self.release.files[n]]
        if differing and not allow_noncanonical:
            found = ", ".join(f"{n} (md5 {checksums[n]})" for n in differing)
            raise DataError(
                f"{self.release.title} files in {folder} differ from the official release: "
                f"{found}. Get the official files ({self.release.how_to_get(root)}), or set "
                "data.allow_noncanonical=true to run on these, marked non-canonical"
            )

        train_images, train_labels = self._read(folder, self.release.train_files)
        test_images, test_labels = self._read(folder, self.release.test_files)
        self._check_counts(folder, train_labels, self.release.n_max, "training")
        self._check_counts(folder, test_labels, self.release.test_per_class, "test")

        kept = canonical_indices(train_labels, self.class_counts)
        val, overlap = val_indices(train_labels, kept)
        if overlap:
            log.warning(
                "%s-LT: class(es) %s kept (nearly) all training images, so %d of their val "
                "images come from the training subset",
                self.release.title,
                ", ".join(map(str, overlap)),
                sum(overlap.values()),
            )
        train = np.concatenate(kept)
        provenance = {
            "source": f"{self.release.title} python release ({self.release.folder})",
            **{f"md5.{name}": md5 for name, md5 in checksums.items()},
        }
        if overlap:
            provenance["val_from_train"] = ", ".join(f"class {c}: {n}" for c, n in overlap.items())
        return LongTailData(
            name=self.name,
            class_names=self._class_names(folder),
            train=_split(train_images, train_labels, train),
            val=_split(train_images, train_labels, val),
            test=_split(test_images, test_labels, np.arange(len(test_labels))),
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            canonical=not differing,
            provenance=provenance,
        )

    def _folder(self, root: str | None, download: bool) -> Path:
        """The release folder under ``root``, fetched first when asked and missing."""
        if root is None:
            raise DataError(
                f"data.root is not set: {self.release.title}-LT needs the {self.release.title} "
                f"python release; {self.release.how_to_get(None)}"
            )
        folder = Path(root) / self.release.folder
        missing = [n for n in self.release.files if not (folder / n).is_file()]
        if missing and download:
            self._download(Path(root))
            missing = [n for n in self.release.files if not (folder / n).is_file()]
        if not missing:
            return folder
        if not Path(root).is_dir():
            problem = f"data.root {root} does not exist"
        elif all((Path(root) / n).is_file() for n in self.release.files):
            problem = (
                f"{root} is the {self.release.folder} folder itself; set data.root to the "
                f"folder that contains it ({Path(root).resolve().parent})"
            )
        elif not folder.is_dir():
            problem = f"there is no {self.release.folder} folder in {root}"
        else:
            problem = f"{folder} lacks {', '.join(missing)}"
        raise DataError(f"{problem}; {self.release.how_to_get(root)}")

    def _download(self, root: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        log.info("downloading %s into %s", self.release.url, root)
        try:
            download_and_extract_archive(
                self.release.url,
                str(root),
                filename=self.release.archive,
                md5=self.release.archive_md5,
            )
        except (OSError, RuntimeError) as error:
            raise DataError(
                f"cannot download {self.release.url} into {root}: {error}. Fetch it by hand: "
                f"{self.release.how_to_get(str(root))}"
            ) from None

    def _unpickle(self, path: Path) -> dict:
        try:
            with open(path, "rb") as handle:
                content = pickle.load(handle, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise DataError(
                f"{path} is not a {self.release.title} python-pickle file ({error}); "
                f"{self.release.how_to_get(str(path.parent.parent))}"
            ) from None
        if not isinstance(content, dict):
            raise DataError(f"{path} holds a {type(content).__name__}, not a CIFAR batch dict")
        return content

    def _read(self, folder: Path, files: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, 3, S, S) uint8 and labels of the given batch files, in file order."""
        images, labels = [], []
        for name in files:
            batch = self._unpickle(folder / name)
            if "data" not in batch or self.release.label_key not in batch:
                raise DataError(
                    f"{folder / name} has no 'data' and '{self.release.label_key}' entries: "
                    f"it is not the {self.release.title} python layout (is it the other CIFAR?)"
                )
            data = np.asarray(batch["data"], dtype=np.uint8)
            side = int(round((data.shape[1] / 3) ** 0.5)) if data.ndim == 2 else 0
            if data.ndim != 2 or 3 * side * side != data.shape[1]:
                raise DataError(
                    f"{folder / name}: 'data' has shape {data.shape}, expected N rows of "
                    "3 x S x S channel-major pixels (3072 for 32 x 32)"
                )
            images.append(data.reshape(-1, 3, side, side))
            labels.append(np.asarray(batch[self.release.label_key], dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)

    def _check_counts(self, folder: Path, labels: np.ndarray, expected: int, which: str) -> None:
        counts = np.bincount(labels, minlength=self.release.num_classes)
        if len(counts) != self.release.num_classes or (counts != expected).any():
            raise DataError(
                f"the {which} set in {folder} has per-class counts {counts.tolist()[:12]}..., "
                f"expected {expected} images in each of {self.release.num_classes} classes; "
                f"it is not the {self.release.title} release"
            )

    def _class_names(self, folder: Path) -> list[str]:
        meta = self._unpickle(folder / self.release.meta_file[0])
        names = meta.get(self.release.names_key)
        if not isinstance(names, list) or len(names) != self.release.num_classes:
            raise DataError(
                f"{folder / self.release.meta_file[0]} lacks {self.release.num_classes} "
                f"'{self.release.names_key}'"
            )
        return [str(n) for n in names]


def _split(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> TensorSplit:
    return TensorSplit(
        torch.from_numpy(np.ascontiguousarray(images[index])), torch.from_numpy(labels[index])
    )


@DATASETS.register("cifar10_lt")
class Cifar10LT(CifarLT):
    """CIFAR-10-LT: the canonical LDAM-DRW subset of CIFAR-10 (ResNet-32, 200 epochs)."""

    name = "cifar10_lt"
    release = CIFAR10


@DATASETS.register("cifar100_lt")
class Cifar100LT(CifarLT):
    """CIFAR-100-LT: the canonical LDAM-DRW subset of CIFAR-100 (ResNet-32, 200 epochs)."""

    name = "cifar100_lt"
    release = CIFAR100
