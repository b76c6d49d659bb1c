"""List-file data sets (ImageNet-LT, Places-LT, iNaturalist 2018) and the image-file pipeline.

Each plugin runs on a tiny generated JPEG tree with its real list file names; the published
sizes are patched down to the tree's, while the real ones stay the plugins' defaults.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torchvision.io import decode_image
from torchvision.transforms.v2 import functional as TF

from ltbench.config import RecipeConfig
from ltbench.data import DATASETS
from ltbench.datasets.list_lt import INAT2018, ListLT, parse_list
from ltbench.errors import DataError
from ltbench.filedata import ImageTransform
from ltbench.runner import execute

from .conftest import run_config
from .lt_fixtures import TINY_TEST, TINY_TRAIN, TINY_VAL, tiny_spec, write_list_tree

NAMES = ["imagenet_lt", "places_lt", "inat2018"]
SMALL = RecipeConfig(image_size=16, test_resize=20, color_jitter=0.4)


@pytest.fixture(params=NAMES)
def tree(request, tmp_path, monkeypatch):
    """(plugin class, root, list lines) of a tiny tree in the layout of one list data set."""
    plugin_cls = DATASETS.get(request.param)
    monkeypatch.setattr(plugin_cls, "spec", tiny_spec(plugin_cls.spec))
    lines = write_list_tree(tmp_path, plugin_cls.spec)
    return plugin_cls, tmp_path, lines


def load(plugin_cls, root, allow_noncanonical=False):
    return plugin_cls().load(root=str(root), download=False, allow_noncanonical=allow_noncanonical)


def test_real_sizes_are_the_published_ones():
    sizes = {
        name: (
            spec.num_classes,
            {split: lines for split, (_, lines) in spec.lists.items()},
            spec.largest,
            spec.smallest,
        )
        for name, spec in [(n, DATASETS.get(n).spec) for n in NAMES]
    }
    assert sizes["imagenet_lt"] == (
        1000,
        {"train": 115_846, "val": 20_000, "test": 50_000},
        1280,
        5,
    )
    assert sizes["places_lt"] == (365, {"train": 62_500, "val": 7_300, "test": 36_500}, 4980, 5)
    assert sizes["inat2018"] == (8142, {"train": 437_513, "test": 24_426}, 1000, 2)
    assert INAT2018.lists["test"][0] == "iNaturalist18_val.txt"


def test_loads_splits_counts_and_provenance(tree):
    plugin_cls, root, lines = tree
    data = load(plugin_cls, root)
    assert data.canonical and data.identity == "canonical"
    assert data.class_counts.tolist() == TINY_TRAIN
    assert torch.bincount(data.test.labels).tolist() == [TINY_TEST] * 4
    if "val" in plugin_cls.spec.lists:
        assert torch.bincount(data.val.labels).tolist() == [TINY_VAL] * 4
    else:
        assert data.val is None  # iNaturalist: its val list is the test split
    assert data.class_names == ["c000", "c001", "c002", "c003"]
    assert data.shot_groups == {"many": [], "medium": [], "few": [0, 1, 2, 3]}
    for file, _ in plugin_cls.spec.lists.values():
        expected = hashlib.sha256((root / file).read_bytes()).hexdigest()
        assert data.provenance[f"sha256.{file}"] == expected
    assert data.train.paths[0].decode() == lines["train"][0].split()[0]


def test_defaults_are_the_published_recipes():
    imagenet = DATASETS.get("imagenet_lt")().defaults()
    assert imagenet["model"]["name"] == "timm/resnext50_32x4d"
    recipe = RecipeConfig(**imagenet["recipe"])
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.weight_decay) == (
        90,
        512,
        0.2,
        5e-4,
    )
    assert (recipe.schedule, recipe.warmup, recipe.image_size, recipe.test_resize) == (
        "cosine",
        0,
        224,
        256,
    )
    assert recipe.color_jitter == 0.4
    inat = RecipeConfig(**DATASETS.get("inat2018")().defaults()["recipe"])
    assert (inat.weight_decay, inat.color_jitter, inat.lr) == (1e-4, 0.0, 0.2)


def test_wrong_line_count_is_refused_unless_allowed(tree):
    plugin_cls, root, lines = tree
    file = plugin_cls.spec.lists["test"][0]
    (root / file).write_text("\n".join(lines["test"][:-1]) + "\n")
    with pytest.raises(DataError, match=rf"{file} has 11 lines, the release has 12"):
        load(plugin_cls, root)
    data = load(plugin_cls, root, allow_noncanonical=True)
    assert not data.canonical and data.identity.startswith("noncanonical-")
    assert len(data.test) == 11


def test_wrong_class_structure_is_refused(tree):
    plugin_cls, root, lines = tree
    file = plugin_cls.spec.lists["train"][0]
    relabelled = [
        line.rsplit(" ", 1)[0] + " 0" if line.endswith(" 3") else line for line in lines["train"]
    ]
    (root / file).write_text("\n".join(relabelled) + "\n")
    with pytest.raises(DataError, match=rf"{file} has 3 classes, the release has 4"):
        load(plugin_cls, root)


def test_missing_image_is_named_before_training(tree):
    plugin_cls, root, lines = tree
    gone = lines["train"][7].split()[0]
    (root / gone).unlink()
    with pytest.raises(DataError, match=rf"1 of the 15 images .* missing .*{gone} \(line 8\)"):
        load(plugin_cls, root)


def test_corrupt_image_is_named_at_first_touch(tree):
    plugin_cls, root, lines = tree
    broken = lines["test"][4].split()[0]
    (root / broken).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = load(plugin_cls, root)
    loader = data.test.loader(
        train=False, recipe=SMALL, mean=data.mean, std=data.std, device=torch.device("cpu"), seed=0
    )
    file = plugin_cls.spec.lists["test"][0]
    with pytest.raises(DataError, match=rf"cannot read image .*{broken} \(line 5 of {file}\)"):
        list(loader.batches(torch.arange(len(data.test)), 4))


def test_missing_lists_root_and_malformed_lines(tree, tmp_path_factory):
    plugin_cls, root, lines = tree
    with pytest.raises(DataError, match="data.root is not set"):
        plugin_cls().load(root=None, download=False, allow_noncanonical=False)
    with pytest.raises(DataError, match="does not exist"):
        load(plugin_cls, root / "nowhere")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match="lacks the list file.*cannot be downloaded"):
        plugin_cls().load(root=str(empty), download=True, allow_noncanonical=False)
    file = plugin_cls.spec.lists["train"][0]
    (root / file).write_text(lines["train"][0] + "\ntrain/c000/a.jpg zero\n")
    with pytest.raises(DataError, match=rf"line 2 of .*{file}.*integer label"):
        load(plugin_cls, root)


def test_parse_list_keeps_line_numbers_and_spaces(tmp_path):
    file = tmp_path / "list.txt"
    file.write_text("a/b c.jpg 3\n\nd/e.jpg 12\r\n")
    parsed = parse_list(file)
    assert parsed.paths == ["a/b c.jpg", "d/e.jpg"]
    assert parsed.labels.tolist() == [3, 12] and parsed.lines.tolist() == [1, 3]


@pytest.fixture
def imagenet_tree(tmp_path, monkeypatch):
    plugin_cls = DATASETS.get("imagenet_lt")
    monkeypatch.setattr(plugin_cls, "spec", tiny_spec(plugin_cls.spec))
    write_list_tree(tmp_path, plugin_cls.spec)
    return load(plugin_cls, tmp_path)


def train_batches(data, epoch, num_workers=0, order=None, recipe=SMALL):
    loader = data.train.loader(
        train=True,
        recipe=recipe,
        mean=data.mean,
        std=data.std,
        device=torch.device("cpu"),
        seed=3,
        num_workers=num_workers,
    )
    order = torch.arange(len(data.train)) if order is None else order
    return list(loader.batches(order, 4, epoch)), loader


def test_batches_follow_the_given_order(imagenet_tree):
    data = imagenet_tree
    order = torch.tensor([14, 0, 0, 9, 3, 14, 2])  # a sampler may repeat images
    batches, _ = train_batches(data, 0, order=order)
    assert [len(labels) for _, labels in batches] == [4, 3]
    assert (
        torch.cat([labels for _, labels in batches]).tolist() == data.train.labels[order].tolist()
    )
    images = batches[0][0]
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert not torch.equal(images[1], images[2])  # the same image, augmented twice


def test_augmentation_depends_only_on_seed_epoch_and_position(imagenet_tree):
    data = imagenet_tree
    epoch1, _ = train_batches(data, 1)
    in_workers, loader = train_batches(data, 1, num_workers=2)
    again = list(loader.batches(torch.arange(len(data.train)), 4, 1))  # persistent workers
    epoch0, _ = train_batches(data, 0)
    for ours, theirs, third in zip(epoch1, in_workers, again, strict=True):
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[0], third[0])
    assert not torch.equal(epoch0[0][0], epoch1[0][0])


def test_test_transform_is_resize_and_centre_crop(imagenet_tree):
    data = imagenet_tree
    loader = data.test.loader(
        train=False, recipe=SMALL, mean=data.mean, std=data.std, device=torch.device("cpu"), seed=0
    )
    (images, _), *_ = loader.batches(torch.tensor([5]), 1)
    raw = decode_image(str(data.test.path(5)))
    expected = TF.center_crop(TF.resize(raw, [20], antialias=True), [16, 16]).float()
    mean = torch.tensor(data.mean).view(3, 1, 1) * 255
    std = torch.tensor(data.std).view(3, 1, 1) * 255
    assert torch.allclose(images[0], (expected - mean) / std, atol=1e-5)


def test_random_crops_respect_scale_and_ratio():
    transform = ImageTransform(train=True, size=8, resize=8, scale=(0.25, 0.5))
    rng = np.random.default_rng(0)
    boxes = [transform.crop_box(60, 80, rng) for _ in range(300)]
    areas = np.array([h * w for _, _, h, w in boxes]) / (60 * 80)
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert areas.min() > 0.23 and areas.max() < 0.52
    assert ratios.min() > 0.72 and ratios.max() < 1.37  # 3/4 .. 4/3, up to rounding
    assert min(min(top, left) for top, left, _, _ in boxes) >= 0
    assert all(top + h <= 60 and left + w <= 80 for top, left, h, w in boxes)


def test_a_run_trains_through_the_file_pipeline(tmp_path, store, monkeypatch):
    plugin_cls: type[ListLT] = DATASETS.get("places_lt")
    monkeypatch.setattr(plugin_cls, "spec", tiny_spec(plugin_cls.spec))
    write_list_tree(tmp_path, plugin_cls.spec)
    config = run_config(
        "dataset.name=places_lt",
        f"data.root={tmp_path}",
        "model.name=resnet8",
        "recipe.epochs=2",
        "recipe.batch_size=8",
        "recipe.image_size=16",
        "recipe.test_resize=18",
        "train.num_workers=1",
    )
    outcome = execute(config)
    run = store.client.get_run(outcome.run_id)
    assert run.data.tags["data_canonical"] == "true"
    assert (
        run.data.tags["data.sha256.Places_LT_val.txt"]
        == hashlib.sha256((tmp_path / "Places_LT_val.txt").read_bytes()).hexdigest()
    )
    assert run.data.metrics["test_count"] == 4 * TINY_TEST
    assert run.data.params["recipe.image_size"] == "16"
