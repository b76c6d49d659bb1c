"""Normalized Batch Normalization (NBN), with an optional logit-rectifying head.

Bao et al., "Normalizing Batch Normalization for Long-Tailed Recognition", IEEE TIP 2024
(arXiv 2501.03122; official code github.com/yuxiangbao/NBN). On long-tailed data the features
that single out rare classes come out weaker than those of frequent classes. NBN treats the
weight and the bias of a BN layer each as one vector, divides it by its L2 norm (plus 1e-6)
and multiplies it by a learnable scalar ``alpha`` (initialised to 1), so the direction of the
affine parameters and their magnitude are learned apart. The normalised values are what the
layer uses, in training and in evaluation.

Scope. The official ResNet-50 / ResNeXt-50 code normalises, in the last stage only, the last
BN of each residual branch and the shortcut BN, with one ``alpha`` shared by all of them, in
the same optimizer group as every other parameter (so ``alpha`` is weight-decayed). That is
the default here:

- on the CIFAR ResNets (stages ``layer1..layer3`` of basic blocks ``bn1``, ``bn2``): ``bn2``
  of every block of ``layer3`` (option-A shortcuts have no BN; with option B the shortcut BN
  ``downsample.1`` of the first block is normalised too);
- on timm ResNets / ResNeXts (``layer1..layer4``): the last BN of every block of ``layer4``
  (``bn3`` of a bottleneck, ``bn2`` of a basic block) and the BN of ``downsample``.

A *stage* is a child of the backbone named ``layer<N>`` (``"last"``, ``"all"``) or any module
path in the backbone; its *blocks* are its children. In a block, the *branch* BNs are the BN
layers outside its shortcut (a child named ``downsample`` or ``shortcut``), in registration
order; the *shortcut* BNs are those inside it. Layer selectors: ``last`` (the last branch BN),
``shortcut``, ``all`` (every BN of the block), or a path within the block (``bn1``).

The logit-rectifying head of the official code (off by default, ``rectify_logits``) passes
the classifier's logits through a BN over the classes without affine parameters: each class
logit is standardised with batch statistics in training and running statistics at test.

NOTE: a weight vector of zeros has no direction. timm zero-initialises the last BN weight of
each residual block; such a weight starts at ones instead, as every BN does in the official
code. A zero bias (every BN's initial bias) is kept, as in the official code: the gradient of
``b / (||b|| + 1e-6)`` at ``b = 0`` is ``1e6`` times the incoming one, so the first step sets
the bias direction and later steps turn it slowly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.errors import PluginError
from ltbench.method import METHODS, Method, MethodContext
from ltbench.models import ImageClassifier

log = logging.getLogger(__name__)

NORM_EPS = 1e-6
SHORTCUT_NAMES = ("downsample", "shortcut")
STAGE_PATTERN = re.compile(r"layer(\d+)")
SELECTORS = ("last", "shortcut", "all")


class NormalizedBatchNorm2d(nn.BatchNorm2d):
    """2-D batch normalisation whose weight and bias are each unit-normalised, times ``alpha``.

    ``weight`` and ``bias`` keep their names (a plain BN's state dict loads into it, all but
    ``alpha``); ``alpha`` is a 0-dim parameter that several layers may share (its value is then
    saved under each layer's key, and loading restores it from any of them).
    """

    def __init__(
        self,
        num_features: int,
        alpha: nn.Parameter,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        norm_eps: float = NORM_EPS,
    ) -> None:
        super().__init__(num_features, eps, momentum, True, track_running_stats)
        self.alpha = alpha
        self.norm_eps = norm_eps

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, alpha: nn.Parameter) -> NormalizedBatchNorm2d:
        """A normalised copy of ``bn``: same parameters, running statistics and settings."""
        if not bn.affine:
            raise PluginError(
                f"nbn: cannot normalise a BN layer without affine parameters ({bn}); it has no "
                "weight or bias to normalise"
            )
        layer = cls(bn.num_features, alpha, bn.eps, bn.momentum, bn.track_running_stats)
        layer.to(device=bn.weight.device, dtype=bn.weight.dtype)
        with torch.no_grad():
            layer.load_state_dict(bn.state_dict(), strict=False)
            if not layer.weight.any():
                layer.weight.fill_(1.0)
        layer.train(bn.training)
        return layer

    def normalized_weight(self) -> torch.Tensor:
        """``alpha * weight / (||weight|| + 1e-6)``: the scale this layer applies."""
        return self.alpha * self.weight / (torch.linalg.vector_norm(self.weight) + self.norm_eps)

    def normalized_bias(self) -> torch.Tensor:
        """``alpha * bias / (||bias|| + 1e-6)``: the shift this layer applies."""
        return self.alpha * self.bias / (torch.linalg.vector_norm(self.bias) + self.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as nn.BatchNorm2d does
                factor = 1.0 / float(self.num_batches_tracked)
        batch_statistics = self.training or self.running_mean is None
        keep_running = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.normalized_weight(),
            self.normalized_bias(),
            batch_statistics,
            factor,
            self.eps,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", normalized (weight, bias) x alpha"


class LogitRectifiedClassifier(ImageClassifier):
    """An image classifier whose logits pass through a BN over the classes without affine
    parameters: the logit-rectifying head of the official NBN code."""

    logit_rectifier: nn.BatchNorm1d

    @classmethod
    def rectify(cls, model: ImageClassifier) -> LogitRectifiedClassifier:
        """Turn ``model`` into a rectified classifier in place, keeping every module it has
        (a classifier another method swapped in, attributes it added)."""
        if type(model) is not ImageClassifier:
            raise PluginError(
                f"nbn: rectify_logits needs an ltbench ImageClassifier, not a "
                f"{type(model).__name__}"
            )
        device = next(model.parameters()).device
        model.__class__ = cls
        model.logit_rectifier = nn.BatchNorm1d(model.num_classes, affine=False, device=device)
        return model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_rectifier(self.classifier(self.backbone(images)))


def is_batchnorm2d(module: nn.Module) -> bool:
    """A plain 2-D BN layer; subclasses with extra behaviour (timm's BatchNormAct2d) are not,
    since replacing them would drop that behaviour."""
    return type(module) is nn.BatchNorm2d


def batchnorm_names(module: nn.Module) -> list[str]:
    """The paths of every BN layer (any dimensionality or subclass) under ``module``."""
    return [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.modules.batchnorm._BatchNorm)
    ]


def stage_names(backbone: nn.Module) -> list[str]:
    """The backbone's ``layer<N>`` children, in order of N: the stages of a ResNet."""
    found = [
        (int(match.group(1)), name)
        for name, _ in backbone.named_children()
        if (match := STAGE_PATTERN.fullmatch(name))
    ]
    return [name for _, name in sorted(found)]


def resolve_stages(backbone: nn.Module, stages: tuple[str, ...]) -> list[str]:
    """Stage paths for the ``stages`` option: ``last``, ``all`` or module paths."""
    known = stage_names(backbone)
    resolved: list[str] = []
    for entry in stages:
        if entry in ("last", "all"):
            if not known:
                raise PluginError(_no_match_message(backbone, f"stages={list(stages)}"))
            resolved += known[-1:] if entry == "last" else known
            continue
        try:
            backbone.get_submodule(entry)
        except AttributeError:
            raise PluginError(
                f"nbn: the backbone has no stage {entry!r}; its stages are "
                f"{', '.join(known) or 'none named layer<N>'} (or give any module path; "
                "'last' and 'all' name the layer<N> stages)"
            ) from None
        resolved.append(entry)
    return list(dict.fromkeys(resolved))


def block_layers(block: nn.Module, selectors: tuple[str, ...]) -> list[str]:
    """Paths (within ``block``) of the BN layers the selectors choose, in registration order."""
    branch, shortcut = [], []
    for name, module in block.named_modules():
        if not name or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        in_shortcut = name.split(".")[0] in SHORTCUT_NAMES
        (shortcut if in_shortcut else branch).append(name)
    chosen: list[str] = []
    for selector in selectors:
        if selector == "last":
            chosen += branch[-1:]
        elif selector == "shortcut":
            chosen += shortcut
        elif selector == "all":
            chosen += branch + shortcut
        elif selector in branch + shortcut:
            chosen.append(selector)
    return list(dict.fromkeys(chosen))


def scope(
    backbone: nn.Module, stages: tuple[str, ...], layers: tuple[str, ...]
) -> list[tuple[str, str]]:
    """``(stage, layer path in the backbone)`` for every BN layer NBN normalises."""
    chosen = []
    for stage in resolve_stages(backbone, stages):
        for block_name, block in backbone.get_submodule(stage).named_children():
            for path in block_layers(block, layers):
                chosen.append((stage, f"{stage}.{block_name}.{path}"))
    if not chosen:
        raise PluginError(
            _no_match_message(backbone, f"stages={list(stages)}, layers={list(layers)}")
        )
    named = [s for s in layers if s not in SELECTORS]
    unmatched = [s for s in named if not any(p.endswith(f".{s}") for _, p in chosen)]
    if unmatched:
        raise PluginError(
            f"nbn: layers entry {unmatched[0]!r} names no BN layer of any block in stages "
            f"{list(stages)}; {_listing(backbone)}"
        )
    return chosen


def _listing(backbone: nn.Module) -> str:
    names = batchnorm_names(backbone)
    return f"the backbone's BN layers are: {', '.join(names) or 'none'}"


def _no_match_message(backbone: nn.Module, what: str) -> str:
    return (
        f"nbn: the scope ({what}) matches no BN layer of backbone {type(backbone).__name__}; "
        f"{_listing(backbone)}. Set method.options.nbn.stages (stage paths, 'last' or 'all') "
        "and method.options.nbn.layers ('last', 'shortcut', 'all' or paths within a block)"
    )


def normalized_layers(model: nn.Module) -> Iterator[tuple[str, NormalizedBatchNorm2d]]:
    """Every normalised BN layer of ``model`` with its path."""
    for name, module in model.named_modules():
        if isinstance(module, NormalizedBatchNorm2d):
            yield name, module


@METHODS.register("nbn")
class NBN(Method):
    """Normalized Batch Normalization (Bao et al., IEEE TIP 2024): unit-norm BN weight and bias
    times a learnable scalar, in the last stage's residual-output BN layers.

    Options: ``stages`` (stage paths, ``last`` or ``all``), ``layers`` (``last``,
    ``shortcut``, ``all`` or paths within a block), ``alpha`` (one ``shared`` scalar, one per
    ``stage`` or one per ``layer``), ``alpha_weight_decay`` (whether alpha is weight-decayed,
    as in the official code), ``rectify_logits`` (the logit-rectifying head, off by default).
    """

    def __init__(
        self,
        stages: tuple[str, ...] = ("last",),
        layers: tuple[str, ...] = ("last", "shortcut"),
        alpha: Literal["shared", "stage", "layer"] = "shared",
        alpha_weight_decay: bool = True,
        rectify_logits: bool = False,
    ) -> None:
        if not stages or not layers:
            raise PluginError("nbn: options stages and layers each need at least one entry")
        self.stages = tuple(stages)
        self.layers = tuple(layers)
        self.alpha = alpha
        self.alpha_weight_decay = alpha_weight_decay
        self.rectify_logits = rectify_logits

    def adapt_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        backbone = model.backbone
        chosen = scope(backbone, self.stages, self.layers)
        alphas: dict[str, nn.Parameter] = {}
        for stage, path in chosen:
            layer = backbone.get_submodule(path)
            if isinstance(layer, NormalizedBatchNorm2d):
                raise PluginError(f"nbn: layer {path} is normalised already; apply nbn once")
            if not is_batchnorm2d(layer):
                raise PluginError(
                    f"nbn: layer {path} is a {type(layer).__name__}, not a plain BatchNorm2d; "
                    "nbn replaces plain 2-D BN layers only. Choose other layers with "
                    "method.options.nbn.layers"
                )
            key = {"shared": "", "stage": stage, "layer": path}[self.alpha]
            if key not in alphas:
                alphas[key] = self._new_alpha(layer.weight)
            parent, _, name = path.rpartition(".")
            normalized = NormalizedBatchNorm2d.from_batchnorm(layer, alphas[key])
            setattr(backbone.get_submodule(parent) if parent else backbone, name, normalized)
        log.info(
            "nbn: normalised %d BN layer(s) with %d alpha(s): %s",
            len(chosen),
            len(alphas),
            ", ".join(path for _, path in chosen),
        )
        if self.rectify_logits and not isinstance(model, LogitRectifiedClassifier):
            model = LogitRectifiedClassifier.rectify(model)
        return model

    def _new_alpha(self, like: torch.Tensor) -> nn.Parameter:
        alpha = nn.Parameter(torch.ones((), device=like.device, dtype=like.dtype))
        if not self.alpha_weight_decay:
            alpha.no_weight_decay = True
        return alpha
