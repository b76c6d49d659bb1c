"""The model registry: CIFAR-style ResNets (one class, registered depths) and timm models."""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.errors import ConfigError, PluginError
from ltbench.registry import Registry, check_options, resolve_options

TIMM_PREFIX = "timm/"


class ImageClassifier(nn.Module):
    """A backbone that returns pooled features, and a classifier on top of them.

    Methods rely on this split: decoupling retrains ``classifier`` on a frozen ``backbone``,
    LWS and tau-norm rescale ``classifier``, NBN changes BN layers inside ``backbone``.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = num_features
        self.num_classes = num_classes
        self.classifier: nn.Module = nn.Linear(num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or downsampling shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.reshapes = stride != 1 or in_planes != planes
        self.pad_channels = planes - in_planes
        self.stride = stride
        self.downsample: nn.Module | None = None
        if self.reshapes and shortcut == "B":
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reshapes:
            return x
        if self.downsample is not None:
            return self.downsample(x)
        # Option A: subsample, then zero-pad the new channels evenly on both sides.
        half = self.pad_channels // 2
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))


class CifarResNet(nn.Module):
    """The ResNet of He et al. for CIFAR: depth 6n+2, three stages of n basic blocks.

    Returns the globally pooled features (``4 * width`` of them). ``shortcut="A"`` is the
    parameter-free shortcut every CIFAR-LT paper uses; ``"B"`` (1x1 conv + BN) is a different
    network and gives different numbers.
    """

    def __init__(
        self, depth: int, in_chans: int = 3, width: int = 16, shortcut: Literal["A", "B"] = "A"
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, ...), not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = [width, 2 * width, 4 * width]
        self.layer1 = self._stage(width, planes[0], blocks, 1, shortcut)
        self.layer2 = self._stage(planes[0], planes[1], blocks, 2, shortcut)
        self.layer3 = self._stage(planes[1], planes[2], blocks, 2, shortcut)
        self.num_features = planes[2]

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Module:
        layers = [BasicBlock(in_planes, planes, stride, shortcut)]
        layers += [BasicBlock(planes, planes, 1, shortcut) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def kaiming_init(model: nn.Module) -> nn.Module:
    """Kaiming-normal weights for every conv and linear layer, as in the LDAM-DRW code."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight)
    return model


class ModelRegistry(Registry):
    """Backbone models.

    Contract. A model plugin is a factory function whose docstring's first line says what it
    is, called as ``factory(num_classes=, in_chans=, **options)`` with typed, defaulted options,
    and returning an :class:`ImageClassifier` (a ``backbone`` returning pooled features and a
    ``classifier``). Besides the registered names, ``timm/<name>`` builds any timm model, untrained,
    as the backbone.
    """

    kind = "model"
    group = "ltbench.models"
    builtin = ""

    def check(self, name: str, plugin: Any) -> None:
        if not callable(plugin) or inspect.isclass(plugin):
            raise PluginError(f"model {name!r} must be a factory function")
        if not (plugin.__doc__ or "").strip():
            raise PluginError(f"model {name!r} needs a docstring saying what it is")
        parameters = list(inspect.signature(plugin).parameters)
        if parameters[:2] != ["num_classes", "in_chans"]:
            raise PluginError(f"model {name!r} must take (num_classes, in_chans, **options)")
        check_options("model", name, plugin, skip=("num_classes", "in_chans"))

    def get(self, name: str) -> Any:
        if name.startswith(TIMM_PREFIX):
            check_timm_name(name[len(TIMM_PREFIX) :])
            return timm_model
        return super().get(name)

    def unknown_message(self, name: str) -> str:
        return super().unknown_message(name) + f", or {TIMM_PREFIX}<any timm model name>"

    def resolve_options(self, name: str, given: dict[str, Any]) -> dict[str, Any]:
        """Validated options with defaults; timm models take timm's own keyword arguments."""
        if name.startswith(TIMM_PREFIX):
            return dict(given)
        return resolve_options(
            "model", name, self.get(name), given, skip=("num_classes", "in_chans")
        )

    def build(
        self, name: str, num_classes: int, in_chans: int, options: dict[str, Any]
    ) -> ImageClassifier:
        options = self.resolve_options(name, options)
        if name.startswith(TIMM_PREFIX):
            return timm_model(num_classes, in_chans, name=name[len(TIMM_PREFIX) :], **options)
        return self.get(name)(num_classes=num_classes, in_chans=in_chans, **options)


MODELS = ModelRegistry()


def check_timm_name(name: str) -> None:
    import difflib

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" (close matches: {', '.join(close)})" if close else ""
        raise PluginError(f"timm has no model {name!r}{hint}; timm.list_models() lists them all")


def timm_model(num_classes: int, in_chans: int, name: str = "", **options: Any) -> ImageClassifier:
    """Any timm model, built untrained, as the backbone."""
    import timm

    check_timm_name(name)
    try:
        backbone = timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_chans, **options
        )
    except TypeError as error:
        raise ConfigError(f"timm model {name!r} refused its options {options}: {error}") from None
    model = ImageClassifier(backbone, backbone.num_features, num_classes)
    nn.init.kaiming_normal_(model.classifier.weight)
    return model


def _register_cifar_resnet(depth: int, note: str) -> None:
    def factory(
        num_classes: int, in_chans: int = 3, width: int = 16, shortcut: Literal["A", "B"] = "A"
    ) -> ImageClassifier:
        backbone = CifarResNet(depth, in_chans, width, shortcut)
        return kaiming_init(ImageClassifier(backbone, backbone.num_features, num_classes))

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcut){note}"
    MODELS.add(factory.__name__, factory, origin=__name__)


_register_cifar_resnet(8, ": the small one for the embedded digits_lt data set")
for _depth in (20, 32, 44, 56, 110):
    _register_cifar_resnet(_depth, "")
