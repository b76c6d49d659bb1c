"""Re-sampling: class-balanced, square-root and progressively balanced class sampling.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020
(arXiv 1910.09217), section 3: with ``n_j`` training images in class ``j``, a class is drawn
with probability ``p_j = n_j^q / sum_i n_i^q`` and an image uniformly within the class.
``q = 1`` is instance-balanced sampling (the plain shuffle), ``q = 0`` class-balanced,
``q = 1/2`` square-root; progressively balanced sampling moves linearly from instance- to
class-balanced over the epochs of its stage, ``p_j(t) = (1 - t/T) p_j^IB + (t/T) p_j^CB``.

The three methods fill the ``sampler`` slot of the first stage. The second stages (cRT, LWS)
bring their own sampler, chosen with their ``sampling`` option (``instance``, ``cbs``,
``sqrt`` or ``pbs``: :data:`SamplingName`), so ``cbs+crt`` means class-balanced sampling in
stage 1 and cRT with its own (class-balanced by default) in stage 2. The engine draws each
epoch's order identically on every rank and shards it, so every sampler here works unchanged
under DDP.
"""

from __future__ import annotations

from typing import Literal

import torch

from ltbench.method import METHODS, ClassSampling, Method, MethodContext

SamplingName = Literal["instance", "cbs", "sqrt", "pbs"]


def power_probs(class_counts: torch.Tensor, power: float) -> torch.Tensor:
    """``p_j = n_j^power / sum_i n_i^power`` over the classes that have training images."""
    counts = class_counts.double()
    present = counts > 0
    weights = torch.where(present, counts.clamp(min=1).pow(power), torch.zeros_like(counts))
    return weights / weights.sum()


def progressive_probs(class_counts: torch.Tensor, epoch: int, epochs: int) -> torch.Tensor:
    """Linear interpolation from instance-balanced (epoch 0) towards class-balanced, with
    weight ``epoch / epochs`` on the class-balanced end (Kang et al.'s ``t / T``)."""
    progress = epoch / max(1, epochs)
    return (1 - progress) * power_probs(class_counts, 1.0) + progress * power_probs(
        class_counts, 0.0
    )


def class_sampling(name: SamplingName, ctx: MethodContext) -> ClassSampling | None:
    """The ``probs(epoch)`` of sampling ``name`` for the stage of ``ctx`` (None: a shuffle)."""
    counts = ctx.class_counts
    if name == "instance":
        return None
    if name == "pbs":
        return lambda epoch: progressive_probs(counts, epoch, ctx.epochs)
    probs = power_probs(counts, {"cbs": 0.0, "sqrt": 0.5}[name])
    return lambda epoch: probs


class ClassSampler(Method):
    """Base of the sampler methods: draws classes by the sampling named in ``sampling``."""

    sampling: SamplingName = "instance"

    def class_sampling(self, ctx: MethodContext) -> ClassSampling | None:
        return class_sampling(self.sampling, ctx)


@METHODS.register("cbs")
class ClassBalanced(ClassSampler):
    """Class-balanced sampling: every class equally likely (Kang et al., ICLR 2020)."""

    sampling = "cbs"


@METHODS.register("sqrt")
class SquareRoot(ClassSampler):
    """Square-root sampling: p_j proportional to sqrt(n_j) (Kang et al., ICLR 2020)."""

    sampling = "sqrt"


@METHODS.register("pbs")
class ProgressivelyBalanced(ClassSampler):
    """Progressively balanced sampling: instance- to class-balanced (Kang et al., ICLR 2020).

    At 0-based epoch ``t`` of ``T``: ``(1 - t/T) p_IB + (t/T) p_CB``.
    """

    sampling = "pbs"
