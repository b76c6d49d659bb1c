"""NBN: the normalised BN layer against its formula, its scope on CIFAR and timm ResNets, its
options, checkpoints, torch.compile, and composition with every registered method."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from ltbench.config import fingerprint, flatten, to_dict
from ltbench.engine import param_groups
from ltbench.errors import ConfigError, PluginError
from ltbench.method import METHODS, Method, MethodContext, SecondStage
from ltbench.methods.nbn import (
    LogitRectifiedClassifier,
    NormalizedBatchNorm2d,
    normalized_layers,
)
from ltbench.models import MODELS, ImageClassifier
from ltbench.runner import execute
from ltbench.tracking import Tracker

from .conftest import FAST, run_config

CTX = MethodContext(10, torch.full((10,), 10), 2, "train", 0, torch.device("cpu"))


def adapted(
    model_name: str = "resnet20", in_chans: int = 3, shortcut: str | None = None, **nbn_options
) -> nn.Module:
    """A freshly built model with NBN applied (``nbn_options`` are the method's options)."""
    torch.manual_seed(0)
    model_options = {"shortcut": shortcut} if shortcut else {}
    model = MODELS.build(model_name, 10, in_chans, model_options)
    return METHODS.compose("nbn", {"nbn": nbn_options}).adapt_model(model, CTX)


def by_hand(vector: list[float], alpha: float) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector))
    return [alpha * v / (norm + 1e-6) for v in vector]


def test_normalised_parameters_follow_the_formula():
    layer = NormalizedBatchNorm2d(3, nn.Parameter(torch.tensor(2.5)))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([3.0, -4.0, 12.0]))
        layer.bias.copy_(torch.tensor([1.0, 2.0, -2.0]))
    assert layer.normalized_weight().tolist() == pytest.approx(by_hand([3, -4, 12], 2.5))
    assert layer.normalized_weight().tolist() == pytest.approx(
        [2.5 * 3 / 13, -2.5 * 4 / 13, 2.5 * 12 / 13]
    )
    assert layer.normalized_bias().tolist() == pytest.approx(by_hand([1, 2, -2], 2.5))


@pytest.mark.parametrize("training", [True, False])
def test_train_and_eval_apply_the_same_normalised_weights(training):
    torch.manual_seed(1)
    layer = NormalizedBatchNorm2d(4, nn.Parameter(torch.tensor(0.7)))
    with torch.no_grad():
        layer.weight.uniform_(-2, 2)
        layer.bias.uniform_(-2, 2)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    reference = nn.BatchNorm2d(4)
    reference.load_state_dict(layer.state_dict(), strict=False)
    with torch.no_grad():
        reference.weight.copy_(layer.normalized_weight())
        reference.bias.copy_(layer.normalized_bias())
    layer.train(training)
    reference.train(training)
    x = torch.randn(5, 4, 3, 3)
    assert torch.allclose(layer(x), reference(x), atol=1e-6)
    assert torch.allclose(layer.running_mean, reference.running_mean)  # same statistics kept
    if not training:  # by hand: running statistics, normalised affine parameters
        mean = layer.running_mean.view(1, -1, 1, 1)
        std = (layer.running_var.view(1, -1, 1, 1) + layer.eps).sqrt()
        w = layer.normalized_weight().view(1, -1, 1, 1)
        b = layer.normalized_bias().view(1, -1, 1, 1)
        assert torch.allclose(layer(x), (x - mean) / std * w + b, atol=1e-5)


def test_default_scope_on_cifar_resnets():
    option_a = adapted("resnet20")
    assert [n for n, _ in normalized_layers(option_a)] == [
        "backbone.layer3.0.bn2",
        "backbone.layer3.1.bn2",
        "backbone.layer3.2.bn2",
    ]
    option_b = adapted("resnet20", shortcut="B")
    assert [n for n, _ in normalized_layers(option_b)] == [
        "backbone.layer3.0.bn2",
        "backbone.layer3.0.downsample.1",
        "backbone.layer3.1.bn2",
        "backbone.layer3.2.bn2",
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("timm/resnet18", ["layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn2"]),
        (
            "timm/resnext50_32x4d",
            ["layer4.0.bn3", "layer4.0.downsample.1", "layer4.1.bn3", "layer4.2.bn3"],
        ),
    ],
)
def test_default_scope_on_timm_resnets(name, expected):
    model = adapted(name)
    layers = dict(normalized_layers(model.backbone))
    assert list(layers) == expected
    assert len({id(layer.alpha) for layer in layers.values()}) == 1
    # timm zero-initialises the last BN of each block; a zero vector has no direction
    assert all(bool((layer.weight == 1).all()) for layer in layers.values())
    assert torch.isfinite(model(torch.randn(2, 3, 64, 64))).all()


def test_alpha_is_the_only_new_parameter_and_learns():
    torch.manual_seed(0)
    plain = MODELS.build("resnet20", 10, 3, {})
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    model = METHODS.compose("nbn").adapt_model(plain, CTX)
    after = dict(model.named_parameters())
    assert set(after) - set(before) == {"backbone.layer3.0.bn2.alpha"}
    assert set(before) <= set(after)
    alpha = after["backbone.layer3.0.bn2.alpha"]
    assert alpha.shape == () and alpha.item() == 1.0

    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8)
    nn.functional.cross_entropy(model(images), labels).backward()
    assert alpha.grad is not None and float(alpha.grad.abs()) > 0
    # the same alpha is shared by all three layers: its gradient sums theirs
    layers = [m for _, m in normalized_layers(model)]
    assert all(layer.alpha is alpha for layer in layers)


@pytest.mark.parametrize(("mode", "count"), [("shared", 1), ("stage", 3), ("layer", 9)])
def test_alpha_per_layer_or_per_stage(mode, count):
    model = adapted("resnet20", stages=("all",), alpha=mode)
    layers = [m for _, m in normalized_layers(model)]
    assert len(layers) == 9  # bn2 of the 3 blocks of each of 3 stages
    assert len({id(layer.alpha) for layer in layers}) == count
    alphas = [n for n, _ in model.named_parameters() if n.endswith(".alpha")]
    assert len(alphas) == count


def test_layers_outside_the_scope_are_untouched():
    torch.manual_seed(0)
    plain = MODELS.build("resnet20", 10, 3, {"shortcut": "B"})
    modules = dict(plain.named_modules())
    values = {k: v.clone() for k, v in plain.state_dict().items()}
    model = METHODS.compose("nbn").adapt_model(plain, CTX)
    scope = {n for n, _ in normalized_layers(model)}
    assert len(scope) == 4
    for name, module in model.named_modules():
        if name in scope:
            assert type(module) is NormalizedBatchNorm2d and type(modules[name]) is nn.BatchNorm2d
        else:
            assert module is modules[name], name
    for key, value in model.state_dict().items():
        if not key.endswith(".alpha"):  # stored values are kept, in the scope too
            assert torch.equal(value, values[key]), key


def test_chosen_layers_and_stages():
    model = adapted("resnet20", stages=("layer2", "layer3"), layers=("bn1",))
    assert [n for n, _ in normalized_layers(model)] == [
        f"backbone.layer{s}.{b}.bn1" for s in (2, 3) for b in range(3)
    ]
    every = adapted("resnet20", shortcut="B", layers=("all",))
    assert len(list(normalized_layers(every))) == 7  # bn1 and bn2 of 3 blocks, one shortcut


def test_a_scope_that_matches_nothing_is_refused_listing_the_bn_layers():
    with pytest.raises(
        PluginError, match=r"layers=\['bn3'\]\) matches no BN layer.*layer3\.0\.bn2"
    ):
        adapted("resnet8", in_chans=1, layers=("bn3",))
    with pytest.raises(
        PluginError, match="no stage 'layer4'; its stages are layer1, layer2, layer3"
    ):
        adapted("resnet8", in_chans=1, stages=("layer4",))
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1))
    model = ImageClassifier(nn.Sequential(backbone, nn.Flatten()), 4, 10)
    with pytest.raises(PluginError, match=r"BN layers are: 0\.1\. Set method\.options\.nbn"):
        METHODS.compose("nbn").adapt_model(model, CTX)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="alpha"):
        METHODS.resolve_options("nbn", {"nbn": {"alpha": "per_channel"}})
    with pytest.raises(ConfigError, match="no option 'scope'"):
        METHODS.resolve_options("nbn", {"nbn": {"scope": "last"}})


def test_alpha_weight_decay_option():
    for decayed in (True, False):
        model = adapted("resnet8", in_chans=1, alpha_weight_decay=decayed)
        alpha = model.backbone.layer3[0].bn2.alpha
        groups = param_groups(model, 5e-4)
        group = next(g for g in groups if any(p is alpha for p in g["params"]))
        assert group["weight_decay"] == (5e-4 if decayed else 0.0)


def test_logit_rectification_standardises_logits_and_is_recorded():
    model = adapted("resnet8", in_chans=1, rectify_logits=True)
    assert isinstance(model, LogitRectifiedClassifier)
    assert not list(model.logit_rectifier.parameters())  # no affine parameters
    logits = model(torch.randn(32, 1, 8, 8))
    assert torch.allclose(logits.mean(0), torch.zeros(10), atol=1e-5)
    assert torch.allclose(logits.var(0, unbiased=False), torch.ones(10), atol=1e-2)

    plain, rectified = (
        run_config("method.name=nbn"),
        run_config("method.name=nbn", "method.options.nbn.rectify_logits=true"),
    )
    assert flatten(to_dict(plain))["method.options.nbn.rectify_logits"] is False
    assert fingerprint(plain, "canonical") != fingerprint(rectified, "canonical")


def test_checkpoint_round_trip_keeps_the_shared_alpha():
    model = adapted("resnet8", in_chans=1, shortcut="B")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.arange(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    alpha = model.backbone.layer3[0].bn2.alpha.item()
    assert alpha != 1.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    alpha_keys = [k for k in state if k.endswith(".alpha")]
    assert alpha_keys == [  # one shared value, saved under each layer
        "backbone.layer3.0.bn2.alpha",
        "backbone.layer3.0.downsample.1.alpha",
    ]

    fresh = adapted("resnet8", in_chans=1, shortcut="B")
    fresh.load_state_dict(state)
    layers = [m for _, m in normalized_layers(fresh)]
    assert all(layer.alpha is layers[0].alpha for layer in layers)  # still one parameter
    assert layers[0].alpha.item() == pytest.approx(alpha)
    model.eval()
    fresh.eval()
    images = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(images), fresh(images))


def test_the_model_compiles():
    model = adapted("resnet8", in_chans=1)
    compiled = torch.compile(model, backend="aot_eager")
    images, labels = torch.randn(6, 1, 8, 8), torch.arange(6)
    model.eval()
    assert torch.allclose(compiled(images), model(images), atol=1e-5)
    model.train()
    nn.functional.cross_entropy(compiled(images), labels).backward()
    assert model.backbone.layer3[0].bn2.alpha.grad is not None


def test_train_compile_flag_trains_the_compiled_model(shared_store, monkeypatch):
    compiled = []

    class Recorder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, images):
            self.calls += 1
            return self.inner(images)

    def record(model, **kwargs):
        compiled.append(Recorder(model))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", record)
    outcome = execute(run_config("method.name=nbn", "recipe.epochs=1", "train.compile=true"))
    assert [type(r.inner).__name__ for r in compiled] == ["DistributedDataParallel"]
    assert compiled[0].calls == 6  # every training step went through it (331 images, batch 64)
    assert outcome.metrics["test_count"] == 400


def test_nbn_trains_under_two_process_ddp(shared_store, tmp_path):
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"),
        *("-m", "ltbench.train", *FAST, "recipe.epochs=2", "tracking.experiment=ddp_nbn"),
        *("method.name=nbn", "method.options.nbn.rectify_logits=true"),
    ]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (run,) = shared_store.client.search_runs(shared_store.experiment_ids(["ddp_nbn"]))
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.metrics["test_count"] == 400
    path = shared_store.download(run.info.run_id, "checkpoints/final.pt", str(tmp_path))
    state = torch.load(path, weights_only=True)["model"]
    assert state["backbone.layer3.0.bn2.alpha"].item() != 1.0  # the shared alpha trained
    assert state["logit_rectifier.running_var"].ne(1.0).all()  # the rectifier's statistics


# --- composition -------------------------------------------------------------------------------


class RetrainHead(Method):
    """Test-only second stage: a fresh classifier retrained on the frozen backbone."""

    def adapt_model(self, model, ctx):
        model.classifier.reset_parameters()
        return model

    def second_stage(self):
        return SecondStage("retrain_head", epochs=1, recipe={"lr": 0.01})


@pytest.fixture(scope="module", autouse=True)
def retrain_head():
    if "toy_retrain_head" not in METHODS:
        METHODS.add("toy_retrain_head", RetrainHead)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One MLflow store for this module's runs (a store costs seconds to create)."""
    folder = tmp_path_factory.mktemp("nbn_store")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        yield Tracker()


def test_second_stage_starts_from_the_stage_one_nbn_values(shared_store):
    store = shared_store
    outcome = execute(run_config("method.name=nbn+toy_retrain_head", "recipe.epochs=2"))
    stage2 = store.client.get_run(outcome.run_id)
    path = store.download(
        stage2.data.tags["stage1_run_id"], "checkpoints/final.pt", str(store_dir(store))
    )
    stage1 = torch.load(path, weights_only=True)["model"]
    nbn_keys = [k for k in stage1 if k.startswith("backbone.layer3.0.bn2.")]
    assert {k.rpartition(".")[2] for k in nbn_keys} >= {"alpha", "weight", "bias", "running_mean"}
    assert float(stage1["backbone.layer3.0.bn2.alpha"]) != 1.0  # stage 1 trained it
    for key in nbn_keys:
        assert torch.equal(stage1[key], outcome.state[key]), key
    assert not torch.equal(stage1["classifier.weight"], outcome.state["classifier.weight"])


def composable_methods() -> list[str]:
    return [name for name in METHODS.names() if name != "nbn" and not name.startswith("toy_")]


@pytest.mark.parametrize("method", composable_methods())
def test_every_method_composes_with_nbn(method, shared_store):
    store = shared_store
    spec = f"{method}+nbn"
    try:
        composed = METHODS.compose(spec)
    except PluginError as error:  # a clash or a refusal must say which components and why
        assert str(error).startswith(f"method {spec!r}") or method in str(error), error
        return
    outcome = execute(run_config(f"method.name={spec}", "recipe.epochs=1"))
    assert outcome.metrics["test_count"] == 400
    alpha = outcome.state["backbone.layer3.0.bn2.alpha"]
    run = store.client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    if composed.second is not None:
        stage1_id = run.data.tags["stage1_run_id"]
        path = store.download(stage1_id, "checkpoints/final.pt", str(store_dir(store)))
        stage1 = torch.load(path, weights_only=True)["model"]
        if composed.second[1].freeze_backbone:
            assert torch.equal(stage1["backbone.layer3.0.bn2.alpha"], alpha)
    else:
        assert float(alpha) != 1.0


def store_dir(store):
    return store.uri.removeprefix("sqlite:///").rpartition("/")[0]
