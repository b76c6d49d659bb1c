"""The method plugin contract, the method registry, and composition of methods with ``+``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltbench.errors import PluginError
from ltbench.registry import Registry, check_options, resolve_options

TRAIN_STAGE = "train"

#: slot name -> (hook name, whether only one component of a stage may fill it)
SLOTS: dict[str, tuple[str, bool]] = {
    "model": ("adapt_model", False),
    "loss": ("build_loss", True),
    "class_weights": ("class_weights", True),
    "sampler": ("class_sampling", True),
    "epoch_start": ("on_epoch_start", False),
    "stage": ("second_stage", True),
    "posthoc": ("posthoc", True),
}

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
ClassSampling = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class MethodContext:
    """What a method's hooks may know about the run they are part of.

    ``class_counts`` are the training counts per class (CPU, int64); ``epochs`` and ``recipe``
    are those of the stage being set up; ``stage`` is ``"train"`` or a second stage's name.
    """

    num_classes: int
    class_counts: torch.Tensor
    epochs: int
    stage: str
    seed: int
    device: torch.device
    recipe: Any = None


@dataclass(frozen=True)
class SecondStage:
    """A stage that starts from a finished first-stage run (for example classifier retraining).

    ``recipe`` overrides fields of the first stage's recipe (for example ``lr``, ``schedule``);
    with ``freeze_backbone`` the backbone's parameters stay fixed and its BN layers stay in eval
    mode, so neither weights nor running statistics move.
    """

    name: str
    epochs: int
    recipe: dict[str, Any] = field(default_factory=dict)
    freeze_backbone: bool = True


@dataclass
class PosthocResult:
    """A post-hoc transform's outcome: the transformed model, what was chosen, and the search."""

    model: nn.Module
    chosen: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax cross-entropy, optionally weighted per class; the loss when no method claims one."""
    return F.cross_entropy(logits, targets, weight=class_weights)


class Method:
    """Base class of method components; the contract is in :class:`MethodRegistry`."""

    def adapt_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Slot ``model``: return the model to train (may change it in place)."""
        return model

    def build_loss(self, ctx: MethodContext) -> LossFn:
        """Slot ``loss``: return ``loss(logits, targets, class_weights)``."""
        return cross_entropy

    def class_weights(self, epoch: int, ctx: MethodContext) -> torch.Tensor | None:
        """Slot ``class_weights``: the per-class loss weights for ``epoch`` (None: unweighted)."""
        return None

    def class_sampling(self, ctx: MethodContext) -> ClassSampling | None:
        """Slot ``sampler``: return ``probs(epoch)``, the chance of drawing each class."""
        return None

    def on_epoch_start(self, epoch: int, model: nn.Module, ctx: MethodContext) -> None:
        """Slot ``epoch_start``: called before each epoch of the component's stage."""

    def second_stage(self) -> SecondStage | None:
        """Slot ``stage``: declare a second stage; the component's other hooks then act in it."""
        return None

    def posthoc(
        self,
        model: nn.Module,
        evaluate_val: Callable[[nn.Module], torch.Tensor],
        ctx: MethodContext,
    ) -> PosthocResult:
        """Slot ``posthoc``: transform the trained model, choosing settings on the val split.

        ``evaluate_val(model)`` returns the per-class accuracy on the val split; the test split
        is never offered.
        """
        return PosthocResult(model, {})

    def refuses(self, others: dict[str, Method]) -> str | None:
        """Not a slot: why this component cannot compose with ``others`` (the other components
        of the composition, by name), or None when it can. Checked when a composition is built,
        before anything trains."""
        return None


def claimed_slots(component: Method | type[Method]) -> list[str]:
    """The slots a component (or component class) fills: the hooks its class overrides."""
    cls = component if inspect.isclass(component) else type(component)
    return [
        slot for slot, (hook, _) in SLOTS.items() if getattr(cls, hook) is not getattr(Method, hook)
    ]


class MethodRegistry(Registry):
    """Method plugins, registered by name and composed with ``+``.

    Contract. A method plugin is a subclass of :class:`Method` whose docstring's first line
    says what it is and names the paper it implements. Its options are keyword arguments of
    ``__init__``, each with a type annotation and a default; the config boundary validates
    them, so a plugin never reads a global config. It fills one or more *slots* by overriding
    the matching hook (keeping the hook's parameter names):

    ``model`` -- ``adapt_model(model, ctx)``
        Change the model: replace BN layers (NBN), swap or rescale the classifier (LDAM's
        cosine classifier, LWS). Several components may fill it; they apply in order.
    ``loss`` -- ``build_loss(ctx)``
        Return ``loss(logits, targets, class_weights)``; may use ``ctx.class_counts`` (LDAM).
    ``class_weights`` -- ``class_weights(epoch, ctx)``
        Per-class loss weights, which may change with the epoch (re-weighting, DRW).
    ``sampler`` -- ``class_sampling(ctx)``
        Return ``probs(epoch)``, the probability of drawing each class; instances within a
        class are drawn uniformly (class-balanced, square-root, progressive). The engine turns
        it into a distributed sampler; without a claim, each epoch is a shuffled permutation.
    ``epoch_start`` -- ``on_epoch_start(epoch, model, ctx)``
        Act at each epoch boundary. Several components may fill it.
    ``stage`` -- ``second_stage()``
        Return a :class:`SecondStage`. The component's other hooks then act in that stage,
        which starts from the finished first-stage run of the other components (found in the
        tracking store by fingerprint and seed, trained first only if missing) and is tracked
        as its own run linked to it (cRT, LWS, tau-norm).
    ``posthoc`` -- ``posthoc(model, evaluate_val, ctx)``
        After training, transform the model with settings chosen on the val split only
        (tau-norm); return a :class:`PosthocResult` whose choice and search curve are logged.

    Composition: ``a+b`` joins components. Within one stage, at most one component may fill
    each of ``loss``, ``class_weights``, ``sampler`` and ``posthoc``; at most one component may
    declare a second stage. A clash is refused with a message naming both components. An alias
    (``ldam_drw`` = ``ldam+drw``) expands to its components. Options are given per component:
    ``method.options.<component>.<option>=value``. A component may also refuse a composition
    that is meaningless for it by overriding ``refuses(others)`` (not a slot) to return the
    reason (tau-norm refuses LDAM's cosine classifier).
    """

    kind = "method"
    group = "ltbench.methods"
    builtin = "ltbench.methods"

    def __init__(self) -> None:
        super().__init__()
        self._aliases: dict[str, tuple[str, str]] = {}

    def check(self, name: str, plugin: Any) -> None:
        if "+" in name or not name.isidentifier():
            raise PluginError(f"method name {name!r} must be an identifier without '+'")
        if not (inspect.isclass(plugin) and issubclass(plugin, Method)):
            raise PluginError(f"method {name!r} must be a subclass of ltbench.method.Method")
        if not (plugin.__doc__ or "").strip():
            raise PluginError(f"method {name!r} needs a docstring saying what it is")
        check_options("method", name, plugin.__init__)
        if not claimed_slots(plugin):
            raise PluginError(
                f"method {name!r} fills no slot; override one of the hooks "
                f"{', '.join(hook for hook, _ in SLOTS.values())}"
            )
        for hook, _ in SLOTS.values():
            ours = inspect.signature(getattr(Method, hook)).parameters
            theirs = inspect.signature(getattr(plugin, hook)).parameters
            if list(theirs) != list(ours):
                raise PluginError(
                    f"method {name!r}: hook {hook} must take ({', '.join(ours)}), "
                    f"not ({', '.join(theirs)})"
                )

    def alias(self, name: str, expansion: str, description: str) -> None:
        """Register ``name`` as shorthand for the composition ``expansion``."""
        if name in self._entries or name in self._aliases:
            raise PluginError(f"method {name!r} is registered twice")
        self._aliases[name] = (expansion, description)

    def names(self) -> list[str]:
        self.load()
        return sorted([*self._entries, *self._aliases])

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._entries or name in self._aliases

    def describe(self, name: str) -> str:
        self.load()
        if name in self._aliases:
            expansion, description = self._aliases[name]
            return f"{description} (= {expansion})"
        return super().describe(name)

    def components(self, spec: str) -> list[str]:
        """Expand a method string such as ``ldam_drw+nbn`` into component names."""
        self.load()
        names: list[str] = []
        for part in spec.split("+"):
            part = part.strip()
            if part in self._aliases:
                names.extend(self.components(self._aliases[part][0]))
            elif part in self._entries:
                names.append(part)
            else:
                raise PluginError(self.unknown_message(part or spec))
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise PluginError(f"method {spec!r} names {repeated[0]} more than once")
        return names

    def resolve_options(self, spec: str, given: dict[str, dict[str, Any]]) -> dict[str, dict]:
        """Validate per-component options for ``spec``; return every component's options."""
        from ltbench.errors import ConfigError

        names = self.components(spec)
        for key in given:
            if key not in names:
                raise ConfigError(
                    f"method.options has an entry for {key!r}, which is not a component of "
                    f"{spec!r}; its components are: {', '.join(names)}"
                )
        return {
            n: resolve_options("method", n, self.get(n).__init__, dict(given.get(n) or {}))
            for n in names
        }

    def compose(self, spec: str, options: dict[str, dict[str, Any]] | None = None) -> Composed:
        """Build the components of ``spec`` with their options and check they can compose."""
        resolved = self.resolve_options(spec, options or {})
        components = {name: self.get(name)(**resolved[name]) for name in resolved}
        return Composed(spec, components, resolved)


class Composed:
    """A composition of method components, split into its first and second stage."""

    def __init__(
        self, spec: str, components: dict[str, Method], options: dict[str, dict[str, Any]]
    ) -> None:
        self.spec = spec
        self.components = components
        self.options = options
        self.stage_of = {
            name: (c.second_stage().name if "stage" in claimed_slots(c) else TRAIN_STAGE)
            for name, c in components.items()
        }
        self._check_clashes()

    def _check_clashes(self) -> None:
        second = [n for n, c in self.components.items() if "stage" in claimed_slots(c)]
        if len(second) > 1:
            raise PluginError(
                f"method {self.spec!r}: {second[0]} and {second[1]} both declare a second "
                "stage; a run has at most one"
            )
        for slot, (_, exclusive) in SLOTS.items():
            if not exclusive:
                continue
            for stage in set(self.stage_of.values()):
                claimants = [n for n in self.in_stage(stage) if slot in self.slots_of(n)]
                if len(claimants) > 1:
                    raise PluginError(
                        f"method {self.spec!r}: {claimants[0]} and {claimants[1]} both claim "
                        f"the {slot} of stage {stage!r}; keep one of them"
                    )
        for name, component in self.components.items():
            reason = component.refuses({n: c for n, c in self.components.items() if n != name})
            if reason:
                raise PluginError(
                    f"method {self.spec!r}: {name} refuses this composition: {reason}"
                )

    def slots_of(self, name: str) -> list[str]:
        return claimed_slots(self.components[name])

    def in_stage(self, stage: str) -> list[str]:
        return [n for n, s in self.stage_of.items() if s == stage]

    @property
    def canonical(self) -> str:
        """Order-free name of the composition, used in fingerprints."""
        return "+".join(sorted(self.components))

    @property
    def second(self) -> tuple[str, SecondStage] | None:
        """The component declaring a second stage and its stage, if any."""
        for name, component in self.components.items():
            if self.stage_of[name] != TRAIN_STAGE:
                return name, component.second_stage()
        return None

    def first_stage(self) -> Composed:
        """The composition without its second-stage component: what stage 1 trains."""
        names = self.in_stage(TRAIN_STAGE)
        components = {n: self.components[n] for n in names}
        return Composed("+".join(names), components, {n: self.options[n] for n in names})

    def claimant(self, slot: str, stage: str) -> Method | None:
        for name in self.in_stage(stage):
            if slot in self.slots_of(name):
                return self.components[name]
        return None

    def adapt_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        for name in self.in_stage(ctx.stage):
            if "model" in self.slots_of(name):
                model = self.components[name].adapt_model(model, ctx)
        return model

    def build_loss(self, ctx: MethodContext) -> LossFn:
        component = self.claimant("loss", ctx.stage)
        return component.build_loss(ctx) if component else cross_entropy

    def class_weights(self, epoch: int, ctx: MethodContext) -> torch.Tensor | None:
        component = self.claimant("class_weights", ctx.stage)
        return component.class_weights(epoch, ctx) if component else None

    def class_sampling(self, ctx: MethodContext) -> ClassSampling | None:
        component = self.claimant("sampler", ctx.stage)
        return component.class_sampling(ctx) if component else None

    def on_epoch_start(self, epoch: int, model: nn.Module, ctx: MethodContext) -> None:
        for name in self.in_stage(ctx.stage):
            if "epoch_start" in self.slots_of(name):
                self.components[name].on_epoch_start(epoch, model, ctx)

    def posthoc_component(self, stage: str) -> Method | None:
        return self.claimant("posthoc", stage)


METHODS = MethodRegistry()
