"""cRT, classifier re-training: a fresh classifier trained alone on the frozen backbone.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
ICLR 2020 (arXiv 1910.09217), section 4. Stage 1 is the other components of the composition
(plain cross-entropy with instance-balanced sampling when there are none); cRT then throws the
classifier away, puts a freshly initialised linear classifier in its place and trains only it,
with class-balanced sampling, on the frozen backbone (its weights and its BN statistics stay as
stage 1 left them).

Stage-2 recipe (:func:`stage2_recipe`, shared with LWS): 10 epochs as in the paper, the first
stage's learning rate, momentum, weight decay, batch size and augmentation, and a cosine
schedule to 0 without warm-up, as in the paper's released configs (there: lr 0.2, batch 512 on
ImageNet-LT, the values of its stage 1). Keeping the data set's own learning rate keeps the
recipe meaningful on every data set family; ``lr`` and ``epochs`` are options.

Whatever stage 1's classifier was (LDAM's cosine one, for instance), cRT's is a plain linear
layer trained with cross-entropy, as in the paper; ``ldam_drw+crt`` is therefore LDAM-DRW's
representation with a class-balanced linear classifier.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ltbench.errors import ConfigError, PluginError
from ltbench.method import METHODS, ClassSampling, Method, MethodContext, SecondStage
from ltbench.methods.sampling import SamplingName, class_sampling


def stage2_recipe(lr: float | None) -> dict[str, Any]:
    """Overrides of the first stage's recipe for a classifier-only second stage."""
    recipe: dict[str, Any] = {"schedule": "cosine", "warmup_epochs": 0}
    if lr is not None:
        recipe["lr"] = lr
    return recipe


def check_stage2_options(method: str, epochs: int, lr: float | None) -> None:
    if epochs < 1:
        raise ConfigError(f"method {method!r}: epochs must be at least 1 (10 in the paper)")
    if lr is not None and lr <= 0:
        raise ConfigError(f"method {method!r}: lr must be positive (or null for stage 1's)")


def num_features_of(model: nn.Module, method: str) -> int:
    num_features = getattr(model, "num_features", None)
    if num_features is None or not hasattr(model, "backbone"):
        raise PluginError(
            f"method {method!r} works on an ltbench ImageClassifier (a model with .backbone, "
            f".num_features and .classifier); got a {type(model).__name__}"
        )
    return num_features


@METHODS.register("crt")
class ClassifierRetraining(Method):
    """cRT: re-initialise the classifier, retrain it alone, class-balanced (Kang et al. 2020)."""

    def __init__(
        self, epochs: int = 10, lr: float | None = None, sampling: SamplingName = "cbs"
    ) -> None:
        check_stage2_options("crt", epochs, lr)
        self.epochs = epochs
        self.lr = lr
        self.sampling = sampling

    def second_stage(self) -> SecondStage | None:
        return SecondStage("crt", self.epochs, stage2_recipe(self.lr), freeze_backbone=True)

    def adapt_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        num_features = num_features_of(model, "crt")
        model.requires_grad_(False)
        model.classifier = nn.Linear(num_features, ctx.num_classes)
        return model

    def class_sampling(self, ctx: MethodContext) -> ClassSampling | None:
        return class_sampling(self.sampling, ctx)
