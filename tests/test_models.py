"""Every registered model builds, runs forward, and has the structure methods rely on."""

from __future__ import annotations

import pytest
import torch

from ltbench.errors import PluginError
from ltbench.models import MODELS, ImageClassifier


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model(name):
    model = MODELS.build(name, num_classes=7, in_chans=3, options={})
    assert isinstance(model, ImageClassifier)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    assert model.backbone(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)


def test_resnet32_is_the_cifar_network():
    model = MODELS.build("resnet32", 10, 3, {})
    assert sum(p.numel() for p in model.parameters()) == 464_154  # about 0.46 M
    blocks = [m for m in model.backbone.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 15
    assert not any(
        isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules()
    )  # option A: no shortcut conv


def test_option_b_adds_shortcut_convs():
    model = MODELS.build("resnet32", 10, 3, {"shortcut": "B"})
    assert sum(p.numel() for p in model.parameters()) > 464_154


def test_timm_model_by_name():
    model = MODELS.build("timm/resnet18", 5, 3, {})
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(PluginError, match="timm has no model 'resnet5'.*resnet50"):
        MODELS.get("timm/resnet5")
