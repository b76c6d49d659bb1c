"""Registries: decorator registration, duplicates, unknown names, contracts, entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest

from ltbench.data import DATASETS, DatasetRegistry
from ltbench.errors import PluginError
from ltbench.method import METHODS, Method, MethodRegistry
from ltbench.models import MODELS


class Lossy(Method):
    """A loss-only method for registry tests."""

    def build_loss(self, ctx):
        return super().build_loss(ctx)


def test_register_and_get():
    registry = MethodRegistry()
    registry.register("lossy")(Lossy)
    assert registry.get("lossy") is Lossy
    assert "lossy" in registry.names()
    assert registry.describe("lossy") == "A loss-only method for registry tests."


def test_duplicate_name_is_an_error():
    registry = MethodRegistry()
    registry.register("lossy")(Lossy)
    with pytest.raises(PluginError, match="'lossy' is registered twice"):
        registry.register("lossy")(Lossy)


@pytest.mark.parametrize(
    "registry, valid", [(METHODS, "ce"), (DATASETS, "digits_lt"), (MODELS, "resnet32")]
)
def test_unknown_name_lists_valid_names(registry, valid):
    with pytest.raises(PluginError) as error:
        registry.get("no_such_thing")
    assert "unknown" in str(error.value) and valid in str(error.value)


def test_unknown_name_suggests_a_close_one():
    with pytest.raises(PluginError, match="did you mean ce"):
        METHODS.components("cee")


def test_method_contract_is_checked_at_registration():
    registry = MethodRegistry()

    class NoSlot(Method):
        """Fills nothing."""

    class Untyped(Method):
        """Option without a type."""

        def __init__(self, scale=1.0):
            self.scale = scale

        def build_loss(self, ctx):
            return super().build_loss(ctx)

    class WrongHook(Method):
        """Hook with other parameter names."""

        def class_weights(self, step, context):
            return None

    class NoDoc(Method):
        def build_loss(self, ctx):
            return super().build_loss(ctx)

    with pytest.raises(PluginError, match="fills no slot"):
        registry.add("no_slot", NoSlot)
    with pytest.raises(PluginError, match="option 'scale' needs a type annotation"):
        registry.add("untyped", Untyped)
    with pytest.raises(PluginError, match=r"hook class_weights must take \(self, epoch, ctx\)"):
        registry.add("wrong_hook", WrongHook)
    with pytest.raises(PluginError, match="needs a docstring"):
        registry.add("no_doc", NoDoc)
    with pytest.raises(PluginError, match="subclass"):
        registry.add("not_a_method", object)


def test_dataset_contract_is_checked():
    with pytest.raises(PluginError, match="must subclass"):
        DatasetRegistry().add("bad", dict)


def test_model_contract_is_checked():
    def no_doc(num_classes: int, in_chans: int = 3):
        return None

    def wrong_args(classes: int):
        """Bad signature."""

    registry = type(MODELS)()
    with pytest.raises(PluginError, match="docstring"):
        registry.add("no_doc", no_doc)
    with pytest.raises(PluginError, match=r"must take \(num_classes, in_chans"):
        registry.add("wrong_args", wrong_args)


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A third-party distribution on sys.path declaring an ``ltbench.methods`` entry point."""
    (tmp_path / "toy_plugin.py").write_text(
        textwrap.dedent('''
        from ltbench.method import Method

        class Toy(Method):
            """Toy third-party method (weights every class 2.0)."""

            def __init__(self, weight: float = 2.0) -> None:
                self.weight = weight

            def class_weights(self, epoch, ctx):
                import torch
                return torch.full((ctx.num_classes,), self.weight)

        class Broken:
            """Not a Method subclass."""
    ''')
    )
    info = tmp_path / "toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ltbench.methods]\ntoy = toy_plugin:Toy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield info
    sys.modules.pop("toy_plugin", None)


def test_entry_point_plugins_register_and_are_checked(installed_plugin):
    registry = MethodRegistry()
    assert "toy" in registry.names()
    assert registry.describe("toy").startswith("Toy third-party method")
    composed = registry.compose("toy", {"toy": {"weight": 3.0}})
    assert composed.components["toy"].weight == 3.0

    (installed_plugin / "entry_points.txt").write_text(
        "[ltbench.methods]\nbroken = toy_plugin:Broken\n"
    )
    with pytest.raises(PluginError, match="'broken' must be a subclass"):
        MethodRegistry().names()


def test_list_command_shows_every_plugin_with_a_description(capsys):
    from ltbench.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*METHODS.names(), *DATASETS.names(), *MODELS.names()]:
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert len(line.split()) > 1, f"{name} has no description"
    assert "default" in out and "timm/<name>" in out
