"""Config layering, its errors, plugin option validation and the fingerprint."""

from __future__ import annotations

import dataclasses

import pytest

from ltbench.config import RecipeConfig, fingerprint, parse_overrides, resolve_run
from ltbench.errors import ConfigError, PluginError
from ltbench.suite import expand, load_suite

from .conftest import run_config


def resolve(*overrides: str):
    return resolve_run([("the command line", parse_overrides(list(overrides)))])


def test_layers_apply_in_order_and_fill_plugin_defaults():
    config = resolve("recipe.epochs=7")
    assert config.recipe.epochs == 7  # the override beats the data set's recipe (30)
    assert config.recipe.batch_size == 64  # from digits_lt's recipe layer
    assert config.recipe.momentum == 0.9  # from the typed defaults
    assert config.model.name == "resnet8"  # the data set's default backbone
    assert config.model.options == {"width": 16, "shortcut": "A"}
    assert config.dataset.options == {"imbalance_ratio": 50.0, "split_seed": 0}
    assert config.method.options == {"ce": {}}


def test_suite_layer_sits_between_defaults_and_overrides():
    config = resolve_run(
        [
            ("suite", {"recipe": {"epochs": 4, "lr": 0.2}}),
            ("cli", parse_overrides(["recipe.lr=0.3"])),
        ]
    )
    assert (config.recipe.epochs, config.recipe.lr) == (4, 0.3)


def test_misspelt_key_is_refused_by_name_with_the_valid_keys():
    with pytest.raises(ConfigError) as error:
        resolve("recipe.epoch=3")
    message = str(error.value)
    assert "unknown config key 'recipe.epoch'" in message
    assert "the command line" in message
    assert "did you mean 'epochs'" in message
    assert "batch_size" in message and "weight_decay" in message


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown config key 'sed'.*did you mean 'seed'"):
        resolve("sed=1")


@pytest.mark.parametrize(
    "override, key",
    [
        ("recipe.epochs=abc", "recipe.epochs"),
        ("recipe.epochs=2.5", "recipe.epochs"),
        ("seed=[1,2]", "seed"),
        ("recipe.flip=maybe", "recipe.flip"),
    ],
)
def test_ill_typed_value_is_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=f"bad value for config key '{key}'"):
        resolve(override)


def test_value_checks_say_what_is_valid():
    with pytest.raises(ConfigError, match="schedule must be one of step, cosine"):
        resolve("recipe.schedule=linear")
    with pytest.raises(ConfigError, match="epochs must be positive"):
        resolve("recipe.epochs=0")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["recipe.epochs"])


def test_plugin_options_are_validated_against_their_signature():
    with pytest.raises(ConfigError, match="has no option 'imbalance'.*imbalance_ratio: float"):
        resolve("dataset.options.imbalance=10")
    with pytest.raises(ConfigError, match="option 'imbalance_ratio' got 'steep'"):
        resolve("dataset.options.imbalance_ratio=steep")
    with pytest.raises(ConfigError, match="option 'shortcut' got 'C'"):
        resolve("model.options.shortcut=C")
    with pytest.raises(ConfigError, match="not a component of 'ce'; its components are: ce"):
        resolve("method.options.ldam.scale=3")


def test_unknown_plugin_names_list_the_valid_ones():
    with pytest.raises(PluginError, match="unknown method 'lmad'.*valid methods: .*ce"):
        resolve("method.name=lmad")
    with pytest.raises(PluginError, match="unknown data set 'cifar_lt'.*digits_lt"):
        resolve("dataset.name=cifar_lt")
    with pytest.raises(PluginError, match="unknown model 'resnet33'.*resnet32.*timm/"):
        resolve("model.name=resnet33")


def test_fingerprint_ignores_seed_paths_and_runtime_settings():
    base = run_config()
    same = [
        run_config("seed=5"),
        run_config("data.root=/elsewhere"),
        run_config("tracking.experiment=other"),
        run_config("train.eval_every=1"),
        run_config("train.device=cpu"),
    ]
    for config in same:
        assert fingerprint(config, "canonical") == fingerprint(base, "canonical")
    different = [
        run_config("recipe.lr=0.2"),
        run_config("dataset.options.imbalance_ratio=10"),
        run_config("model.name=resnet20"),
    ]
    for config in different:
        assert fingerprint(config, "canonical") != fingerprint(base, "canonical")
    assert fingerprint(base, "noncanonical-abc") != fingerprint(base, "canonical")


def test_warmup_rule_scales_with_the_schedule():
    assert RecipeConfig(epochs=200).warmup == 5
    assert RecipeConfig(epochs=10).warmup == 1
    assert RecipeConfig(epochs=40).warmup == 1
    assert RecipeConfig(epochs=100, warmup_epochs=0).warmup == 0
    assert dataclasses.replace(RecipeConfig(), epochs=400).warmup == 10


def test_suite_file_that_does_not_exist():
    with pytest.raises(ConfigError, match="suite file 'nope.yaml' does not exist.*default"):
        load_suite("nope.yaml")
    with pytest.raises(ConfigError, match="no suite 'nope'.*packaged suite.*default"):
        load_suite("nope")


def test_suite_overrides_split_between_suite_and_runs(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmethods: [ce]\nseeds: [0, 1]\nconfig:\n  recipe: {epochs: 4}\n")
    suite, run_layer = load_suite(str(path), ["seeds=[3]", "recipe.lr=0.3"])
    assert suite.seeds == [3] and suite.config == {"recipe": {"epochs": 4}}
    assert run_layer == {"recipe": {"lr": 0.3}}
    path.write_text("name: mine\nmethod: [ce]\n")
    with pytest.raises(ConfigError, match="unknown config key 'method'.*methods"):
        load_suite(str(path))


def test_name_overrides_select_the_suites_entries_instead_of_renaming_every_run():
    suite, run_layer = load_suite(
        "default", ["method.name=ldam_drw", "method.options.drw.beta=0.99", "seed=4"]
    )
    assert suite.methods == ["ldam_drw"] and suite.seeds == [4]
    assert run_layer == {"method": {"options": {"drw": {"beta": 0.99}}}}
    runs = expand(suite, run_layer)
    assert [(r.method.name, r.seed) for r in runs] == [("ldam_drw", 4)]
    assert runs[0].method.options["drw"]["beta"] == 0.99
    with pytest.raises(ConfigError, match="sets both method.name and methods"):
        load_suite("default", ["method.name=ce", "methods=[ce]"])


def test_a_suite_listing_a_run_twice_runs_it_once():
    suite, run_layer = load_suite("default", ["methods=[ce,ce,cbs]", "seeds=[0]"])
    assert [r.method.name for r in expand(suite, run_layer)] == ["ce", "cbs"]


def test_a_clashing_composition_is_refused_before_any_run_starts():
    suite, run_layer = load_suite("default", ["methods=[ce,ce+ldam]"])
    with pytest.raises(PluginError, match="ce and ldam both claim the loss"):
        expand(suite, run_layer)
