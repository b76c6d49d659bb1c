"""Small generated data in the real file formats: CIFAR python pickles and list-file trees.

CIFAR fixtures have the real per-class structure (5000 x 10 or 500 x 100 training images in a
shuffled official-like order, a balanced test set) but 2 x 2 images, whose first two pixels
encode the image's index in its file set, so a test can tell exactly which images a split
holds. List-file trees hold small real JPEGs under the layout the lists name.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg

from ltbench.datasets.cifar_lt import CifarRelease
from ltbench.datasets.list_lt import ListSpec

SIDE = 2


def encode(indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of 3 x SIDE x SIDE channel-major pixels whose first two bytes hold the index."""
    rows = rng.integers(0, 256, (len(indices), 3 * SIDE * SIDE), dtype=np.uint8)
    rows[:, 0] = indices % 256
    rows[:, 1] = indices // 256
    return rows


def decode(images: torch.Tensor) -> np.ndarray:
    """The indices encoded in images (N, 3, SIDE, SIDE)."""
    flat = images.reshape(len(images), -1).numpy().astype(np.int64)
    return flat[:, 0] + 256 * flat[:, 1]


def shuffled_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def write_cifar(root: Path, release: CifarRelease) -> dict[str, np.ndarray]:
    """Write ``release``'s files under ``root`` with the real layout; returns the labels."""
    folder = root / release.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    train = shuffled_labels(release.num_classes, release.n_max, seed=1)
    test = shuffled_labels(release.num_classes, release.test_per_class, seed=2)
    parts = np.array_split(np.arange(len(train)), len(release.train_files))
    for name, part in zip(release.train_files, parts, strict=True):
        _dump(folder / name, release, encode(part, rng), train[part], name)
    (test_name,) = release.test_files
    _dump(folder / test_name, release, encode(np.arange(len(test)), rng), test, test_name)
    names = [f"class_{c}" for c in range(release.num_classes)]
    names[:2] = ["airplane", "automobile"]
    meta = {release.names_key: names}
    if release.label_key == "fine_labels":
        meta["coarse_label_names"] = [f"super_{c}" for c in range(20)]
    with open(folder / release.meta_file[0], "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return {"train": train, "test": test}


def _dump(path: Path, release: CifarRelease, rows, labels, name: str) -> None:
    record = {
        "batch_label": name,
        release.label_key: labels.tolist(),
        "data": rows,
        "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
    }
    if release.label_key == "fine_labels":
        record["coarse_labels"] = (labels // 5).tolist()
    with open(path, "wb") as handle:
        pickle.dump(record, handle, protocol=2)


def pinned(release: CifarRelease, root: Path) -> CifarRelease:
    """``release`` with the md5 sums of the fixture files, to exercise the canonical path."""
    from ltbench.datasets.cifar_lt import md5sum

    folder = root / release.folder

    def sums(files: dict[str, str]) -> dict[str, str]:
        return {name: md5sum(folder / name) for name in files}

    meta_name = release.meta_file[0]
    return dataclasses.replace(
        release,
        train_files=sums(release.train_files),
        test_files=sums(release.test_files),
        meta_file=(meta_name, md5sum(folder / meta_name)),
    )


#: a tiny list data set: 4 classes with 6 4 3 2 training images
TINY_TRAIN = [6, 4, 3, 2]
TINY_VAL = 2
TINY_TEST = 3


def tiny_spec(spec: ListSpec) -> ListSpec:
    """``spec`` with the same list files but the tiny data set's sizes."""
    sizes = {"train": sum(TINY_TRAIN), "val": TINY_VAL * 4, "test": TINY_TEST * 4}
    return dataclasses.replace(
        spec,
        num_classes=len(TINY_TRAIN),
        lists={split: (file, sizes[split]) for split, (file, _) in spec.lists.items()},
        largest=max(TINY_TRAIN),
        smallest=min(TINY_TRAIN),
    )


def jpeg(height: int, width: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return encode_jpeg(image, quality=90).numpy().tobytes()


def write_list_tree(root: Path, spec: ListSpec) -> dict[str, list[str]]:
    """JPEGs of varied sizes and the split lists of ``spec`` (tiny sizes) under ``root``.

    Train and val images live under ``train/<class>/``, test ones under ``val/<class>/``, as in
    the ImageNet-LT lists. Returns each split's list lines.
    """
    per_class = {
        "train": TINY_TRAIN,
        "val": [TINY_VAL] * len(TINY_TRAIN),
        "test": [TINY_TEST] * len(TINY_TRAIN),
    }
    written = {}
    seed = 0
    for split, (file, _) in spec.lists.items():
        folder = "val" if split == "test" else "train"
        lines = []
        for label, count in enumerate(per_class[split]):
            for i in range(count):
                path = f"{folder}/c{label:03d}/{split}_{i}.jpg"
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                seed += 1
                (root / path).write_bytes(jpeg(20 + 3 * (seed % 5), 24 + 2 * (seed % 7), seed))
                lines.append(f"{path} {label}")
        (root / file).write_text("\n".join(lines) + "\n")
        written[split] = lines
    return written
