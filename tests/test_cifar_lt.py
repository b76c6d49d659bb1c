"""CIFAR-10-LT and CIFAR-100-LT: the canonical subset, checksums, val split, errors, a run."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ltbench import leaderboard
from ltbench.config import parse_overrides, resolve_run
from ltbench.data import DATASETS
from ltbench.datasets.cifar_lt import CIFAR10, CIFAR100, Cifar10LT, Cifar100LT, md5sum
from ltbench.errors import ConfigError, DataError
from ltbench.runner import execute

from .conftest import run_config
from .lt_fixtures import decode, pinned, write_cifar

CIFAR10_RHO100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    labels = {"cifar10_lt": write_cifar(root, CIFAR10), "cifar100_lt": write_cifar(root, CIFAR100)}
    return root, labels


def load(name, root, allow_noncanonical=True, **options):
    plugin = DATASETS.get(name)(**options)
    return plugin.load(root=str(root), download=False, allow_noncanonical=allow_noncanonical)


def reference_indices(labels: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """The LDAM-DRW construction, written the way its code does it: global NumPy state."""
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        kept = []
        for the_class, number in zip(np.unique(labels), counts, strict=True):
            idx = np.where(labels == the_class)[0]
            np.random.shuffle(idx)
            kept.append(idx[:number])
        return kept
    finally:
        np.random.set_state(saved)


def test_cifar10_lt_counts_match_the_published_sizes(cifar_root):
    root, _ = cifar_root
    data = load("cifar10_lt", root)
    assert data.class_counts.tolist() == CIFAR10_RHO100
    assert data.shot_groups == {"many": list(range(8)), "medium": [8, 9], "few": []}
    sizes = {rho: len(load("cifar10_lt", root, imbalance_ratio=rho).train) for rho in (50, 10)}
    assert (len(data.train), sizes[50], sizes[10]) == (12406, 13996, 20431)
    assert len(data.test) == 10000 and torch.bincount(data.test.labels).tolist() == [1000] * 10


def test_cifar100_lt_counts_match_the_published_sizes(cifar_root):
    root, _ = cifar_root
    sizes = [len(load("cifar100_lt", root, imbalance_ratio=rho).train) for rho in (100, 50, 10)]
    assert sizes == [10847, 12608, 19573]
    counts = load("cifar100_lt", root, imbalance_ratio=200).class_counts
    assert (counts[0].item(), counts[-1].item(), counts.sum().item()) == (500, 2, 9502)


@pytest.mark.parametrize("name", ["cifar10_lt", "cifar100_lt"])
@pytest.mark.parametrize("rho", [100, 10])
def test_training_images_are_exactly_the_canonical_ones(cifar_root, name, rho):
    root, labels = cifar_root
    data = load(name, root, imbalance_ratio=rho)
    chosen = decode(data.train.images)
    counts = data.class_counts.tolist()
    expected = np.concatenate(reference_indices(labels[name]["train"], counts))
    assert np.array_equal(chosen, expected)  # same images, same order: class by class
    assert np.array_equal(data.train.labels.numpy(), labels[name]["train"][chosen])


def test_val_is_balanced_seeded_and_held_out(cifar_root):
    root, labels = cifar_root
    data = load("cifar10_lt", root)
    assert torch.bincount(data.val.labels).tolist() == [20] * 10
    val = decode(data.val.images)
    assert np.array_equal(data.val.labels.numpy(), labels["cifar10_lt"]["train"][val])
    overlap = set(val.tolist()) & set(decode(data.train.images).tolist())
    # class 0 keeps all 5000 of its images, so its 20 val images come from training
    assert {labels["cifar10_lt"]["train"][i] for i in overlap} == {0} and len(overlap) == 20
    assert data.provenance["val_from_train"] == "class 0: 20"
    assert np.array_equal(val, decode(load("cifar10_lt", root).val.images))
    assert len(set(val.tolist())) == 200


def test_checksum_mismatch_is_refused_unless_allowed(cifar_root):
    root, _ = cifar_root
    with pytest.raises(DataError, match=r"differ from the official release.*allow_noncanonical"):
        load("cifar10_lt", root, allow_noncanonical=False)
    data = load("cifar10_lt", root)
    folder = root / CIFAR10.folder
    assert not data.canonical and data.identity.startswith("noncanonical-")
    assert data.provenance["md5.data_batch_3"] == md5sum(folder / "data_batch_3")
    assert data.provenance["md5.batches.meta"] == md5sum(folder / "batches.meta")


def test_matching_checksums_are_canonical(cifar_root, monkeypatch):
    root, _ = cifar_root
    monkeypatch.setattr(Cifar100LT, "release", pinned(CIFAR100, root))
    data = load("cifar100_lt", root, allow_noncanonical=False)
    assert data.canonical and data.identity == "canonical"
    assert data.provenance["md5.train"] == md5sum(root / CIFAR100.folder / "train")


def test_official_checksums_are_the_releases():
    from torchvision.datasets import CIFAR10 as TorchCifar10
    from torchvision.datasets import CIFAR100 as TorchCifar100

    for ours, theirs in [(CIFAR10, TorchCifar10), (CIFAR100, TorchCifar100)]:
        assert ours.train_files == dict(theirs.train_list)
        assert ours.test_files == dict(theirs.test_list)
        assert ours.meta_file == (theirs.meta["filename"], theirs.meta["md5"])
        assert (ours.url, ours.archive_md5) == (theirs.url, theirs.tgz_md5)


def test_defaults_are_the_published_recipe(cifar_root):
    config = resolve_run([("test", parse_overrides(["dataset.name=cifar10_lt"]))])
    recipe = config.recipe
    assert recipe.epochs == 200
    assert config.model.name == "resnet32"
    assert (recipe.batch_size, recipe.lr, recipe.weight_decay, recipe.momentum) == (
        128,
        0.1,
        2e-4,
        0.9,
    )
    assert (recipe.warmup, recipe.lr_steps, recipe.lr_step_factors) == (
        5,
        [0.8, 0.9],
        [0.01, 0.0001],
    )
    assert (recipe.crop_padding, recipe.flip) == (4, True)
    data = load("cifar100_lt", cifar_root[0])
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2023, 0.1994, 0.2010)
    assert len(data.class_names) == 100 and data.class_names[0] == "airplane"


def test_bad_imbalance_ratio():
    with pytest.raises(ConfigError, match="between 1 and 5000"):
        Cifar10LT(imbalance_ratio=0.5)
    with pytest.raises(ConfigError, match="between 1 and 500"):
        Cifar100LT(imbalance_ratio=501)


def test_missing_and_misplaced_files(cifar_root, tmp_path):
    root, _ = cifar_root
    with pytest.raises(DataError, match="data.root is not set.*cifar-10-python.tar.gz"):
        Cifar10LT().load(root=None, download=False, allow_noncanonical=True)
    with pytest.raises(DataError, match="does not exist"):
        load("cifar10_lt", tmp_path / "nowhere")
    with pytest.raises(DataError, match="no cifar-10-batches-py folder in"):
        load("cifar10_lt", tmp_path)
    with pytest.raises(DataError, match="is the cifar-10-batches-py folder itself"):
        load("cifar10_lt", root / CIFAR10.folder)
    partial = tmp_path / "partial" / CIFAR100.folder
    partial.mkdir(parents=True)
    (partial / "train").write_bytes((root / CIFAR100.folder / "train").read_bytes())
    with pytest.raises(DataError, match="lacks test, meta"):
        load("cifar100_lt", tmp_path / "partial")


def test_wrong_contents_are_named(cifar_root, tmp_path):
    root, _ = cifar_root
    folder = tmp_path / CIFAR10.folder
    folder.mkdir()
    for name in CIFAR10.files:
        (folder / name).write_bytes((root / CIFAR10.folder / name).read_bytes())
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_2 is not a CIFAR-10 python-pickle file"):
        load("cifar10_lt", tmp_path)

    record = {"data": np.zeros((10, 12), np.uint8), "fine_labels": [0] * 10}
    (folder / "data_batch_2").write_bytes(pickle.dumps(record))
    with pytest.raises(DataError, match="not the CIFAR-10 python layout"):
        load("cifar10_lt", tmp_path)

    record = {"data": np.zeros((10, 12), np.uint8), "labels": [0] * 10}
    (folder / "data_batch_2").write_bytes(pickle.dumps(record))
    with pytest.raises(DataError, match="per-class counts .* expected 5000"):
        load("cifar10_lt", tmp_path)


def test_download_fetches_the_official_archive(cifar_root, tmp_path, monkeypatch):
    import torchvision.datasets.utils

    source, _ = cifar_root
    calls = []

    def fake_download(url, download_root, filename, md5):
        calls.append((url, filename, md5))
        write_cifar(tmp_path, CIFAR10)

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    data = Cifar10LT().load(root=str(tmp_path), download=True, allow_noncanonical=True)
    assert calls == [(CIFAR10.url, CIFAR10.archive, CIFAR10.archive_md5)]
    assert len(data.train) == 12406
    Cifar10LT().load(root=str(tmp_path), download=True, allow_noncanonical=True)
    assert len(calls) == 1  # present files are not fetched again


def test_noncanonical_run_is_tagged_and_marked(cifar_root, store):
    root, _ = cifar_root
    config = run_config(
        "dataset.name=cifar10_lt",
        "dataset.options.imbalance_ratio=10",
        f"data.root={root}",
        "data.allow_noncanonical=true",
        "model.name=resnet8",
        "recipe.epochs=1",
        "recipe.batch_size=1024",
    )
    outcome = execute(config)
    run = store.client.get_run(outcome.run_id)
    assert run.data.tags["data_canonical"] == "false"
    folder = root / CIFAR10.folder
    assert run.data.tags["data.md5.test_batch"] == md5sum(folder / "test_batch")
    assert run.data.params["data.identity"].startswith("noncanonical-")
    assert run.data.metrics["test_count"] == 10000

    board = leaderboard.build(*leaderboard.collect(store))
    assert board.rows["canonical"].tolist() == [False]
    text = leaderboard.render(board, "markdown")
    assert f"cifar10_lt (imbalance_ratio=10) {leaderboard.NONCANONICAL_MARK}" in text
    assert "non-canonical data" in text


def test_canonical_and_noncanonical_runs_never_average(cifar_root, monkeypatch):
    from ltbench.config import fingerprint

    root, _ = cifar_root
    config = run_config("dataset.name=cifar10_lt", f"data.root={root}")
    noncanonical = load("cifar10_lt", root)
    monkeypatch.setattr(Cifar10LT, "release", pinned(CIFAR10, root))
    canonical = load("cifar10_lt", root, allow_noncanonical=False)
    assert fingerprint(config, canonical.identity) != fingerprint(config, noncanonical.identity)


@pytest.mark.parametrize(("pad", "flip"), [(4, True), (1, False), (0, True)])
def test_batch_augmentation_is_per_image_crop_and_flip(pad, flip):
    from ltbench.config import RecipeConfig
    from ltbench.data import TensorSplit

    images = torch.randint(0, 256, (40, 3, 6, 5), dtype=torch.uint8)
    split = TensorSplit(images, torch.zeros(40, dtype=torch.int64))
    recipe = RecipeConfig(crop_padding=pad, flip=flip)
    loader = split.loader(
        train=True, recipe=recipe, mean=(0.0,) * 3, std=(1 / 255,) * 3, device="cpu", seed=2
    )
    order = torch.randperm(40)
    (augmented, _), *_ = loader.batches(order, 40, epoch=3)

    generator = torch.Generator().manual_seed(2 * 100_003 + 3)
    shifts = torch.randint(0, 2 * pad + 1, (2, 40), generator=generator) if pad else None
    flips = torch.rand(40, generator=generator) < 0.5 if flip else torch.zeros(40, dtype=bool)
    padded = torch.nn.functional.pad(images[order], (pad,) * 4)
    for b in range(40):
        dy, dx = (int(shifts[0, b]), int(shifts[1, b])) if pad else (0, 0)
        expected = padded[b, :, dy : dy + 6, dx : dx + 5]
        expected = expected.flip(2) if flips[b] else expected
        assert torch.allclose(augmented[b], expected.float(), atol=1e-3)
    assert bool(flips.any()) == flip and not flips.all()  # the draws did vary


def test_packaged_cifar_suites():
    from ltbench.engine import lr_factor
    from ltbench.suite import expand, load_suite

    suite, layer = load_suite("cifar_lt", ["data.root=/data/cifar"])
    runs = expand(suite, layer)
    grid = {(r.dataset.name, r.dataset.options["imbalance_ratio"], r.seed) for r in runs}
    methods = {r.method.name for r in runs}
    assert len(grid) == 18 and len(runs) == 18 * len(methods)
    baselines = {"ce", "cbs", "sqrt", "pbs", "inv_freq", "effective_number", "drw", "ldam"}
    baselines |= {"ldam_drw", "crt", "lws", "tau_norm"}
    assert baselines <= methods and "nbn" in methods
    assert {"ldam_drw+nbn", "crt+nbn", "lws+nbn", "tau_norm+nbn", "cbs+nbn"} <= methods
    assert {rho for _, rho, _ in grid} == {100, 50, 10} and {s for *_, s in grid} == {0, 1, 2}
    assert all(r.model.name == "resnet32" and r.recipe.epochs == 200 for r in runs)
    assert "data.root=" in suite.description

    suite, layer = load_suite("cifar_lt_cpu", ["data.root=/data/cifar"])
    cpu = expand(suite, layer)
    assert len(cpu) == 6 and all(r.model.name == "resnet8" for r in cpu)
    assert [lr_factor(e, cpu[0].recipe) for e in range(3)] == [1.0, 1.0, 0.0001]
    assert "data.root=" in suite.description
