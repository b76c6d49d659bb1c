"""tau-norm: rescale each class weight vector of the trained classifier by 1 / ||w_j||^tau.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
ICLR 2020 (arXiv 1910.09217), section 4. After joint training the norms of the classifier's
class weight vectors grow with the class's size; ``w_j <- w_j / ||w_j||^tau`` evens them out
(tau = 0: unchanged, tau = 1: unit norm). tau is chosen in ``[tau_min, tau_max]`` (0 to 2,
step 0.1) by the mean per-class accuracy on the val split (classes without val images left
out), never on test; ties go to the smaller tau. The chosen tau is logged as the param
``posthoc.tau`` and the whole search as ``posthoc_curve.csv``.

It is a second stage without training (0 epochs) on the finished first-stage run, tracked as
its own run linked to it; the checkpoint it logs is the untransformed stage-1 model (the
runner saves the model before the post-hoc transform), so ``posthoc.tau`` is part of its
result. The bias, if the classifier has one, is left as it is (the paper's rule names only the
weights). A classifier without a linear layer (LDAM's cosine classifier, whose class weight
vectors are normalised in every forward pass already) is refused: tau-norm would change
nothing there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ltbench.errors import ConfigError, PluginError
from ltbench.method import METHODS, Method, MethodContext, PosthocResult, SecondStage
from ltbench.methods.ldam import LDAM


def tau_normalised(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """``w_j / ||w_j||^tau`` for each row ``w_j`` of ``weight``."""
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


def tau_grid(tau_min: float, tau_max: float, step: float) -> list[float]:
    count = int(round((tau_max - tau_min) / step))
    return [round(tau_min + i * step, 10) for i in range(count + 1)]


def linear_layer(model: nn.Module) -> nn.Linear:
    """The last linear layer of ``model.classifier``, whose rows are the class weights."""
    classifier = getattr(model, "classifier", None)
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)] if classifier else []
    if not linears:
        raise PluginError(
            "method 'tau_norm' rescales the class weight vectors of a linear classifier, but "
            f"this model's classifier ({type(classifier).__name__}) has no nn.Linear; tau-norm "
            "cannot apply to it"
        )
    return linears[-1]


@METHODS.register("tau_norm")
class TauNormalisation(Method):
    """tau-norm: w_j / ||w_j||^tau, tau chosen on the val split (Kang et al., ICLR 2020)."""

    def __init__(self, tau_min: float = 0.0, tau_max: float = 2.0, tau_step: float = 0.1) -> None:
        if not (0 <= tau_min <= tau_max and tau_step > 0):
            raise ConfigError(
                "method 'tau_norm': need 0 <= tau_min <= tau_max and tau_step > 0 (the paper "
                f"searches 0 to 2); got {tau_min}, {tau_max}, {tau_step}"
            )
        self.taus = tau_grid(tau_min, tau_max, tau_step)

    def second_stage(self) -> SecondStage | None:
        return SecondStage("tau_norm", epochs=0, freeze_backbone=True)

    def refuses(self, others: dict[str, Method]) -> str | None:
        cosine = [name for name, component in others.items() if isinstance(component, LDAM)]
        if cosine:
            return (
                f"{cosine[0]} trains a cosine classifier, whose class weight vectors are "
                "normalised in every forward pass, so tau-norm would change nothing; use "
                f"{cosine[0]} alone, or {cosine[0]}+crt / {cosine[0]}+lws"
            )
        return None

    def posthoc(
        self,
        model: nn.Module,
        evaluate_val: Callable[[nn.Module], torch.Tensor],
        ctx: MethodContext,
    ) -> PosthocResult:
        layer = linear_layer(model)
        original = layer.weight.detach().clone()
        curve = []
        for tau in self.taus:
            with torch.no_grad():
                layer.weight.copy_(tau_normalised(original, tau))
            curve.append({"tau": tau, "val_acc": 100 * float(evaluate_val(model).nanmean())})
        best = max(curve, key=lambda row: row["val_acc"])  # first maximum: the smaller tau
        with torch.no_grad():
            layer.weight.copy_(tau_normalised(original, best["tau"]))
        chosen = {"tau": best["tau"], "val_acc": best["val_acc"]}
        return PosthocResult(model, chosen, curve)
