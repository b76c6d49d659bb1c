"""LWS, learnable weight scaling: one learned scale per class on the frozen classifier.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
ICLR 2020 (arXiv 1910.09217), section 4. After stage 1, everything is frozen (backbone, its BN
statistics, the classifier) and one scale ``f_j`` per class, initialised to 1, multiplies class
``j``'s logit; only the scales are trained, with class-balanced sampling and cross-entropy.
For a linear classifier without bias this is the paper's ``w_j -> f_j * w_j``; with a bias the
bias is scaled too, which is what rescaling the logit means. The stage-2 recipe is cRT's
(:func:`ltbench.methods.crt.stage2_recipe`). The scales are exempt from weight decay: decay
would pull them towards 0, a direction that means nothing for a scale whose neutral value is 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ltbench.method import METHODS, ClassSampling, Method, MethodContext, SecondStage
from ltbench.methods.crt import check_stage2_options, num_features_of, stage2_recipe
from ltbench.methods.sampling import SamplingName, class_sampling


class ScaledClassifier(nn.Module):
    """A frozen classifier whose logits are multiplied by one learnable scale per class."""

    def __init__(self, classifier: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.inner = classifier.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))
        self.scales.no_weight_decay = True

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner(features) * self.scales

    def train(self, mode: bool = True) -> ScaledClassifier:
        super().train(mode)
        self.inner.eval()  # frozen: any BN statistics inside it must not move either
        return self


@METHODS.register("lws")
class LearnableWeightScaling(Method):
    """LWS: learn one scale per class on the frozen classifier, class-balanced (Kang et al.)."""

    def __init__(
        self, epochs: int = 10, lr: float | None = None, sampling: SamplingName = "cbs"
    ) -> None:
        check_stage2_options("lws", epochs, lr)
        self.epochs = epochs
        self.lr = lr
        self.sampling = sampling

    def second_stage(self) -> SecondStage | None:
        return SecondStage("lws", self.epochs, stage2_recipe(self.lr), freeze_backbone=True)

    def adapt_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        num_features_of(model, "lws")
        model.requires_grad_(False)
        model.classifier = ScaledClassifier(model.classifier, ctx.num_classes)
        return model

    def class_sampling(self, ctx: MethodContext) -> ClassSampling | None:
        return class_sampling(self.sampling, ctx)
