"""Focal loss as an ltbench method plugin, shipped as its own package.

Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (arXiv 1708.02002): the
cross-entropy of each example is multiplied by ``(1 - p_t)^gamma``, where ``p_t`` is the
predicted probability of its true class, so well-classified examples count less.

ltbench finds this class through the entry point in pyproject.toml; it is checked against the
method contract when it loads. It must not register itself with ``METHODS.register`` as well:
the entry point already does, and a second registration is an error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltbench.errors import ConfigError
from ltbench.method import LossFn, Method, MethodContext


class FocalLoss(Method):
    """Focal loss: cross-entropy scaled by (1 - p_t)^gamma (Lin et al., ICCV 2017)."""

    def __init__(self, gamma: float = 2.0) -> None:
        if gamma < 0:
            raise ConfigError(f"method 'focal': gamma must be 0 or more, not {gamma}")
        self.gamma = gamma

    def build_loss(self, ctx: MethodContext) -> LossFn:
        gamma = self.gamma

        def loss(
            logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None
        ) -> torch.Tensor:
            log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
            focal = -((1 - log_p.exp()) ** gamma) * log_p
            if class_weights is None:
                return focal.mean()
            weights = class_weights[targets]
            return (weights * focal).sum() / weights.sum()

        return loss
