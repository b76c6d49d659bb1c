"""``ltbench data check``: files, checksums, split sizes, classes, shot groups, what is missing."""

from __future__ import annotations

import re

import pytest

from ltbench.cli import main
from ltbench.data import DATASETS
from ltbench.datacheck import check
from ltbench.datasets.cifar_lt import CIFAR10, Cifar10LT
from ltbench.errors import ConfigError

from .lt_fixtures import pinned, tiny_spec, write_cifar, write_list_tree


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, CIFAR10)
    return root


def test_cifar_report_counts_classes_groups_and_checksums(cifar_root):
    report = check("cifar10_lt", str(cifar_root), ["imbalance_ratio=50"])
    text = report.text
    assert "cifar10_lt (imbalance_ratio=50)" in text
    assert "cifar-10-batches-py/data_batch_1  differs   md5 " in text
    assert "release has c99cafc152244af753f735de768cd75f" in text
    assert "train    13,996 images, 10 classes" in text
    assert "val         200 images, 10 classes" in text
    assert "test     10,000 images, 10 classes" in text
    assert "largest classes:  airplane (5000), automobile (3237)" in text
    assert "smallest classes: class_9 (100), class_8 (154)" in text
    assert "many        9 classes,   13,896 training images" in text
    assert "few     empty" in text
    assert "canonical: NO" in text and not report.usable
    allowed = check("cifar10_lt", str(cifar_root), ["data.allow_noncanonical=true"])
    assert allowed.usable and "12,406 images" in allowed.text


def test_canonical_files_are_reported_as_such(cifar_root, monkeypatch):
    monkeypatch.setattr(Cifar10LT, "release", pinned(CIFAR10, cifar_root))
    report = check("cifar10_lt", str(cifar_root))
    assert report.usable and "canonical: yes" in report.text
    assert report.text.count("  ok  ") == 7


def test_missing_files_say_how_to_get_them(tmp_path):
    report = check("cifar100_lt", str(tmp_path))
    assert not report.usable
    assert "cifar-100-python/train  missing" in report.text
    assert "cannot load: there is no cifar-100-python folder" in report.text
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in report.text


def test_list_tree_with_a_missing_image(tmp_path, monkeypatch):
    plugin_cls = DATASETS.get("imagenet_lt")
    monkeypatch.setattr(plugin_cls, "spec", tiny_spec(plugin_cls.spec))
    lines = write_list_tree(tmp_path, plugin_cls.spec)
    gone = lines["val"][3].split()[0]
    (tmp_path / gone).unlink()
    (tmp_path / "ImageNet_LT_test.txt").unlink()
    text = check("imagenet_lt", str(tmp_path)).text
    assert re.search(r"  ImageNet_LT_train.txt +ok +15 lines, sha256 [0-9a-f]{16}\n", text)
    assert re.search(r"  images of ImageNet_LT_train.txt +ok +0 of 15 missing\n", text)
    assert re.search(
        rf"  images of ImageNet_LT_val.txt +missing +1 of 8 missing, e.g. {gone}", text
    )
    assert re.search(r"  ImageNet_LT_test.txt +missing +the test list", text)
    assert "cannot load:" in text and "ImageNet_LT_test.txt" in text
    assert "image-net.org" in text


def test_embedded_data_set_needs_no_root():
    report = check("digits_lt", None)
    assert report.usable and "train       331 images, 10 classes" in report.text
    assert "shot groups (many > 50, few < 20 training images):" in report.text


def test_cli_takes_settings_after_the_root(cifar_root, capsys):
    code = main(["data", "check", "cifar10_lt", "--root", str(cifar_root), "imbalance_ratio=10"])
    assert code == 1  # non-canonical and not allowed
    assert "20,431 images" in capsys.readouterr().out
    args = ["data", "check", "cifar10_lt", "--root", str(cifar_root)]
    assert main([*args, "data.allow_noncanonical=true"]) == 0
    assert main([*args, "imbalance_ratio=0.1"]) == 2
    assert "between 1 and 5000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--bogus"])


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="not data.root"):
        check("digits_lt", None, ["data.root=/x"])
    with pytest.raises(ConfigError, match="has no option 'ratio'"):
        check("cifar10_lt", None, ["ratio=3"])
