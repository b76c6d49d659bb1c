"""DRW, deferred re-weighting: train unweighted, then re-weight from a deferred epoch on.

Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss",
NeurIPS 2019 (arXiv 1906.07413), section 3.3. Until the deferred epoch the loss is unweighted;
from it on, each class is weighted by ``(1 - beta) / (1 - beta^n_j)`` with ``beta = 0.9999``
(the effective-number weights of Cui et al. 2019), normalised to sum to ``C``.

The deferred epoch follows the length of the stage: 0-based epoch ``e`` is re-weighted once
``e >= int(deferred_fraction * E)`` for ``E`` epochs, which is epoch 160 of 200 on CIFAR (the
same epoch the CIFAR recipe's first learning-rate step takes effect), so a shortened schedule
defers by the same rule.
"""

from __future__ import annotations

import torch

from ltbench.errors import ConfigError
from ltbench.method import METHODS, Method, MethodContext
from ltbench.methods.reweighting import check_beta, effective_number_weights


def deferred_epoch(epochs: int, deferred_fraction: float) -> int:
    """The first 0-based epoch that is re-weighted: ``int(deferred_fraction * epochs)``."""
    return int(deferred_fraction * epochs)


@METHODS.register("drw")
class DeferredReweighting(Method):
    """Deferred re-weighting: unweighted, then effective-number weights from 0.8 E (Cao et al.)."""

    def __init__(self, beta: float = 0.9999, deferred_fraction: float = 0.8) -> None:
        check_beta(beta, "drw")
        if not 0 <= deferred_fraction <= 1:
            raise ConfigError(
                f"method 'drw': deferred_fraction must be in [0, 1] (0.8 in the paper), "
                f"not {deferred_fraction}"
            )
        self.beta = beta
        self.deferred_fraction = deferred_fraction

    def class_weights(self, epoch: int, ctx: MethodContext) -> torch.Tensor | None:
        if epoch < deferred_epoch(ctx.epochs, self.deferred_fraction):
            return None
        return effective_number_weights(ctx.class_counts, self.beta)
