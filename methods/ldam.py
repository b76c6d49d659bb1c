"""LDAM, the label-distribution-aware margin loss, on a cosine classifier; and LDAM-DRW.

Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss",
NeurIPS 2019 (arXiv 1906.07413). Class ``j`` with ``n_j`` training images gets the margin
``m_j`` proportional to ``n_j^(-1/4)``, scaled so that the largest margin is ``max_margin``
(0.5). The classifier is a cosine one: each logit is the dot product of the L2-normalised
feature and the L2-normalised class weight vector. The loss subtracts the target class's
margin from its logit and takes the (optionally class-weighted) cross-entropy of the logits
scaled by ``s`` (30):

    loss = CE(s * (z - m_y * onehot(y)), y; weights)

At test time the prediction is the argmax of the cosines. ``ldam_drw`` is ``ldam+drw``: the
same loss, with deferred re-weighting (:mod:`ltbench.methods.drw`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.errors import ConfigError, PluginError
from ltbench.method import METHODS, LossFn, Method, MethodContext


class CosineClassifier(nn.Module):
    """Logits are cosines: normalised features times normalised class weight vectors.

    ``weight`` has the shape of ``nn.Linear``'s, (classes, features); there is no bias.
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, num_features))
        nn.init.kaiming_normal_(self.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()


def ldam_margins(class_counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    """``m_j`` proportional to ``n_j^(-1/4)``, the largest equal to ``max_margin``."""
    margins = class_counts.double().clamp(min=1).pow(-0.25)
    return (margins * (max_margin / margins.max())).float()


def ldam_loss(margins: torch.Tensor, scale: float) -> LossFn:
    """The LDAM loss with these per-class margins and logit scale."""

    def loss(
        logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None
    ) -> torch.Tensor:
        shift = (
            F.one_hot(targets, logits.shape[1]).to(logits.dtype) * margins.to(logits)[targets, None]
        )
        return F.cross_entropy(scale * (logits - shift), targets, weight=class_weights)

    return loss


@METHODS.register("ldam")
class LDAM(Method):
    """LDAM loss: margins proportional to n_j^(-1/4), cosine classifier, s = 30 (Cao et al.)."""

    def __init__(self, max_margin: float = 0.5, scale: float = 30.0) -> None:
        if max_margin < 0 or scale <= 0:
            raise ConfigError(
                f"method 'ldam': max_margin must be >= 0 and scale > 0 (0.5 and 30 in the "
                f"paper), not {max_margin} and {scale}"
            )
        self.max_margin = max_margin
        self.scale = scale

    def adapt_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        num_features = getattr(model, "num_features", None)
        if num_features is None or not hasattr(model, "classifier"):
            raise PluginError(
                "method 'ldam' replaces the classifier of an ltbench ImageClassifier (a model "
                f"with .num_features and .classifier); got a {type(model).__name__}"
            )
        model.classifier = CosineClassifier(num_features, ctx.num_classes)
        return model

    def build_loss(self, ctx: MethodContext) -> LossFn:
        return ldam_loss(ldam_margins(ctx.class_counts, self.max_margin), self.scale)


METHODS.alias(
    "ldam_drw",
    "ldam+drw",
    "LDAM-DRW: the LDAM loss with deferred re-weighting (Cao et al., NeurIPS 2019)",
)
