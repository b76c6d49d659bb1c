"""Re-weighting: per-class loss weights from the training counts, from the first epoch on.

- ``inv_freq``: inverse class frequency, ``w_j proportional to 1 / n_j``, the classic
  re-weighting baseline (as compared in Cao et al., NeurIPS 2019, and Cui et al., CVPR 2019).
- ``effective_number``: the class-balanced weights of Cui et al., "Class-Balanced Loss Based on
  Effective Number of Samples", CVPR 2019 (arXiv 1901.05555): ``w_j proportional to
  (1 - beta) / (1 - beta^n_j)``, the inverse of the class's effective number of samples.

Both are normalised to sum to the number of classes ``C``, so an even weighting is all ones.
A class with no training image gets the weight of a class with one (it is never a target, so
the value never matters; it keeps the weights finite). The loss stays the loss of whichever
component claims it (cross-entropy by default, LDAM's in ``ldam+effective_number``).
"""

from __future__ import annotations

import torch

from ltbench.errors import ConfigError
from ltbench.method import METHODS, Method, MethodContext


def normalise(weights: torch.Tensor) -> torch.Tensor:
    """Scale ``weights`` to sum to their number (the number of classes)."""
    return weights / weights.sum() * len(weights)


def inverse_frequency_weights(class_counts: torch.Tensor) -> torch.Tensor:
    """``1 / n_j``, normalised to sum to ``C``."""
    return normalise(1.0 / class_counts.double().clamp(min=1))


def effective_number_weights(class_counts: torch.Tensor, beta: float) -> torch.Tensor:
    """``(1 - beta) / (1 - beta^n_j)``, normalised to sum to ``C`` (Cui et al. 2019)."""
    counts = class_counts.double().clamp(min=1)
    return normalise((1 - beta) / (1 - torch.pow(beta, counts)))


def check_beta(beta: float, method: str) -> None:
    if not 0 <= beta < 1:
        raise ConfigError(
            f"method {method!r}: beta must be in [0, 1) (0.9999 in the papers), not {beta}"
        )


@METHODS.register("inv_freq")
class InverseFrequency(Method):
    """Inverse-frequency loss weights, 1/n_j normalised to sum to C (re-weighting baseline)."""

    def class_weights(self, epoch: int, ctx: MethodContext) -> torch.Tensor | None:
        return inverse_frequency_weights(ctx.class_counts)


@METHODS.register("effective_number")
class EffectiveNumber(Method):
    """Class-balanced loss weights from the effective number of samples (Cui et al., CVPR 2019)."""

    def __init__(self, beta: float = 0.9999) -> None:
        check_beta(beta, "effective_number")
        self.beta = beta

    def class_weights(self, epoch: int, ctx: MethodContext) -> torch.Tensor | None:
        return effective_number_weights(ctx.class_counts, self.beta)
