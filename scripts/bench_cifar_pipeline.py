"""Images per second of the CIFAR-10-LT input pipeline, and of ResNet-32 training steps:
ltbench's (uint8 images held on the device, augmented there in whole batches) against the
reference torchvision way (the CIFAR10 data set on the same long-tailed indices, PIL
transforms RandomCrop(32, padding=4) / RandomHorizontalFlip / ToTensor / Normalize, and a
DataLoader with 2 workers), in one run.

    python scripts/bench_cifar_pipeline.py ROOT [--device cuda] [--epochs 2] [--limit N]

ROOT holds cifar-10-batches-py (the official release, or a copy such as the one
cifar10-from-jpeg writes: a copy is non-canonical, which is fine for timing). Each figure is
wall-clock over whole epochs as a training loop sees them, worker start-up included; the
first epoch of each pipeline is a warm-up and is not counted unless --epochs is 1. --limit
cuts each epoch to N images, for a quick check. NOTE: on a machine shared with other jobs,
torch's CPU threads spin against them and every CPU figure drops many times over; measure on
an idle machine (or pass --threads 1 to see the uncontended single-thread rate).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from ltbench.config import RecipeConfig
from ltbench.data import DATASETS, exponential_profile
from ltbench.datasets.cifar_lt import CIFAR10, CIFAR_MEAN, CIFAR_STD, canonical_indices
from ltbench.models import MODELS


class UncheckedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10, reading a copy whose checksums differ from the release."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        import pickle

        with open(f"{self.root}/{self.base_folder}/{self.meta['filename']}", "rb") as handle:
            self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(root: str, rho: float, device: torch.device, batch: int, limit: int | None) -> Callable:
    data = DATASETS.get("cifar10_lt")(imbalance_ratio=rho).load(
        root=root, download=False, allow_noncanonical=True
    )
    loader = data.train.loader(
        train=True,
        recipe=RecipeConfig(),
        mean=data.mean,
        std=data.std,
        device=device,
        seed=0,
        channels_last=True,
    )

    def epoch(number: int) -> Iterable:
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(number))
        return loader.batches(order[:limit], batch, number)

    return epoch


def reference(
    root: str, rho: float, device: torch.device, batch: int, workers: int, limit: int | None
) -> Callable:
    augment = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    full = UncheckedCIFAR10(root, train=True, transform=augment)
    labels = np.asarray(full.targets)
    counts = exponential_profile(CIFAR10.n_max, CIFAR10.num_classes, rho)
    indices = np.concatenate(canonical_indices(labels, counts))
    rng = np.random.default_rng(0)
    subset = Subset(full, rng.permutation(indices)[:limit].tolist())
    loader = DataLoader(
        subset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )

    def epoch(number: int) -> Iterable:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            yield images.contiguous(memory_format=torch.channels_last), targets.to(device)

    return epoch


def pipeline_rate(epoch: Callable, epochs: int, device: torch.device) -> float:
    return timed(epoch, epochs, device, lambda images, labels: None)


def training_rate(epoch: Callable, epochs: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = MODELS.build("resnet32", 10, 3, {}).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(epoch, epochs, device, step)


def timed(epoch: Callable, epochs: int, device: torch.device, work: Callable) -> float:
    """Images per second over the epochs after the first (or over the one epoch)."""
    images_seen, seconds = 0, 0.0
    for number in range(epochs):
        sync(device)
        started = time.perf_counter()
        count = 0
        for images, labels in epoch(number):
            work(images, labels)
            count += len(labels)
        sync(device)
        if number > 0 or epochs == 1:
            images_seen += count
            seconds += time.perf_counter() - started
    return images_seen / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder holding cifar-10-batches-py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--imbalance-ratio", type=float, default=100.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs + 1 warm-up")
    parser.add_argument("--limit", type=int, help="images per epoch (default: all)")
    parser.add_argument(
        "--threads", type=int, help="torch threads of the main process (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = (args.imbalance_ratio, device, args.batch_size)
    pipelines = {
        "ours": ours(args.root, *setup, args.limit),
        "reference": reference(args.root, *setup, args.workers, args.limit),
    }

    print(
        f"CIFAR-10-LT rho {args.imbalance_ratio:g}, device {device}, batch {args.batch_size}, "
        f"{args.epochs} epoch(s) of {args.limit or 'all'} images each, "
        f"reference with {args.workers} workers, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'images/s':<26}{'ours':>12}{'reference':>12}{'ratio':>9}")
    for label, measure in [
        ("input pipeline alone", pipeline_rate),
        ("ResNet-32 train steps", training_rate),
    ]:
        rates = {name: measure(epoch, args.epochs, device) for name, epoch in pipelines.items()}
        ratio = rates["ours"] / rates["reference"]
        print(f"{label:<26}{rates['ours']:>12,.0f}{rates['reference']:>12,.0f}{ratio:>8.2f}x")


if __name__ == "__main__":
    main()
