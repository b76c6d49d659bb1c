"""Typed, layered run configuration: defaults, the data set's recipe, a suite file, overrides.

The schema is a tree of dataclasses; OmegaConf merges the layers onto it and refuses unknown
keys and ill-typed values. Plugin options (``dataset.options``, ``model.options``,
``method.options``) are validated against the plugins' own typed keyword arguments. The
fingerprint of a run hashes everything that can change its result, and nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ltbench.errors import ConfigError

SCHEDULES = ("step", "cosine")


@dataclass
class DatasetConfig:
    """Which data set, and its options (imbalance ratio, ...)."""

    name: str = "digits_lt"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the data set's files are; never part of the fingerprint."""

    root: str | None = None
    download: bool = False
    allow_noncanonical: bool = False


@dataclass
class ModelConfig:
    """The backbone: a registered name or ``timm/<name>``; empty means the data set's default."""

    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """The method, e.g. ``ce`` or ``ldam_drw+nbn``, and options per component."""

    name: str = "ce"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeConfig:
    """The training schedule. Each data set brings its published recipe as a layer."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    schedule: str = "step"
    warmup_epochs: int | None = None
    lr_steps: list[float] = field(default_factory=lambda: [0.8, 0.9])
    lr_step_factors: list[float] = field(default_factory=lambda: [0.01, 0.0001])
    crop_padding: int = 4
    flip: bool = True
    # The image-file pipeline (ImageNet-LT, Places-LT, iNaturalist): training crops are random
    # resized crops of ``image_size`` with an area fraction in ``crop_scale``; test images are
    # resized to ``test_resize`` (shorter side) and centre-cropped to ``image_size``.
    # ``color_jitter`` is the brightness / contrast / saturation strength (0: off). In-memory
    # data sets (CIFAR, digits) use ``crop_padding`` and ``flip`` instead.
    image_size: int = 224
    test_resize: int = 256
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"recipe.schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}"
            )
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"recipe.{key} must be positive, not {value}")
        if len(self.lr_steps) != len(self.lr_step_factors):
            raise ConfigError("recipe.lr_steps and recipe.lr_step_factors must have one entry each")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ConfigError("recipe.warmup_epochs must be 0 or more (or null for the rule)")
        if not (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ConfigError(
                f"recipe.crop_scale must be [low, high] in (0, 1], not {self.crop_scale}"
            )
        if self.image_size <= 0 or self.test_resize < self.image_size:
            raise ConfigError(
                "recipe.test_resize must be at least recipe.image_size, both positive"
            )
        if self.color_jitter < 0:
            raise ConfigError(f"recipe.color_jitter must be 0 or more, not {self.color_jitter}")

    @property
    def warmup(self) -> int:
        """Warm-up epochs: as given, else the CIFAR rule ``max(1, round(5 * epochs / 200))``."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return max(1, round(5 * self.epochs / 200))


@dataclass
class TrainConfig:
    """How to run: settings that do not change the result."""

    device: str = "auto"
    eval_every: int = 0
    log_every: int = 10
    channels_last: bool = True
    compile: bool = False
    checkpoint: bool = True
    num_workers: int = 4
    diagnostics: bool = True
    sync_bn: bool = False  # SyncBatchNorm over ranks (CUDA only); the tags record world_size
    resume: bool = True  # checkpoint every epoch and on SIGTERM; continue an interrupted run
    checkpoint_dir: str = "checkpoints"  # resume checkpoints, one folder per run


@dataclass
class TrackingConfig:
    """The MLflow store (default: ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` here)."""

    uri: str | None = None
    experiment: str = "ltbench"


@dataclass
class RunConfig:
    """Everything that defines one run: data set, method, backbone, recipe and seed."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0


#: sections and keys that cannot change a run's result, left out of its fingerprint
NOT_FINGERPRINTED = ("seed", "data", "train", "tracking")


Layer = tuple[str, Any]


def parse_overrides(pairs: list[str]) -> DictConfig:
    """Turn ``key=value`` strings into a config layer (values parsed as YAML)."""
    for pair in pairs:
        if "=" not in pair or pair.startswith("="):
            raise ConfigError(f"override {pair!r} must look like key=value, e.g. recipe.epochs=5")
    try:
        return OmegaConf.from_dotlist(pairs)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot parse overrides {pairs}: {error}") from None


def merge_layers(schema: Any, layers: list[Layer]) -> DictConfig:
    """Merge named layers onto a dataclass schema, naming the layer of any mistake."""
    if not layers:
        return OmegaConf.structured(schema)
    merged = _structured(schema)  # merge returns a new config; the cached one stays as it is
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as error:
            raise config_error(error, source) from None
    return merged


@functools.cache
def _structured(schema: Any) -> DictConfig:
    """The schema's typed defaults, built once: merging copies them and never changes them."""
    return OmegaConf.structured(schema)


def config_error(error: OmegaConfBaseException, source: str) -> ConfigError:
    """Say which key was wrong, where it came from, and what is valid instead."""
    key = error.full_key or "?"
    owner = error.object_type
    valid = [f.name for f in dataclasses.fields(owner)] if dataclasses.is_dataclass(owner) else []
    if isinstance(error, ConfigKeyError) and valid:
        close = difflib.get_close_matches(str(error.key), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        section = key.rpartition(".")[0]
        where = f"under {section!r}" if section else "at the top level"
        return ConfigError(
            f"unknown config key {key!r} in {source}{hint}; valid keys {where}: {', '.join(valid)}"
        )
    reason = (error.msg or str(error)).splitlines()[0] if (error.msg or str(error)) else ""
    if not reason and error.value is not None:
        reason = f"{error.value!r} is not a valid value"
    expected = ""
    if valid and error.key in valid:
        kind = {f.name: f.type for f in dataclasses.fields(owner)}[error.key]
        expected = f"; {key} expects {kind if isinstance(kind, str) else kind.__name__}"
    return ConfigError(f"bad value for config key {key!r} in {source}: {reason}{expected}")


def resolve_run(layers: list[Layer]) -> RunConfig:
    """Resolve a run's config: defaults, then its data set's layer, then ``layers`` in order.

    Plugin names are checked and every plugin's options are validated and completed with
    their defaults, so the result says everything the run will use.
    """
    from ltbench.data import DATASETS
    from ltbench.method import METHODS
    from ltbench.models import MODELS
    from ltbench.registry import resolve_options

    first = merge_layers(RunConfig, layers)
    dataset_name = first.dataset.name
    dataset_cls = DATASETS.get(dataset_name)
    dataset_options = resolve_options(
        "data set", dataset_name, dataset_cls.__init__, dict(first.dataset.options)
    )
    dataset_layer = (
        "the defaults of data set " + dataset_name,
        dataset_cls(**dataset_options).defaults(),
    )
    merged = merge_layers(RunConfig, [dataset_layer, *layers])
    try:
        config: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise config_error(error, "the config") from None

    config.dataset.options = dataset_options
    if not config.model.name:
        raise ConfigError(
            f"no backbone: data set {dataset_name!r} names no default; set model.name, one of "
            f"{', '.join(MODELS.names())} or timm/<name>"
        )
    MODELS.get(config.model.name)
    config.model.options = MODELS.resolve_options(config.model.name, dict(config.model.options))
    # Composing checks the components against each other (two claims on one slot, a refused
    # pairing) here, so that a suite with a bad composition stops before any of its runs.
    config.method.options = METHODS.compose(
        config.method.name, {k: dict(v or {}) for k, v in config.method.options.items()}
    ).options
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(config)))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fingerprint(config: RunConfig, data_identity: str) -> str:
    """Hash of what can change a run's result: the config without seed, paths and run-time
    settings, with the method's components in a fixed order, plus the identity of the data
    (``"canonical"`` or a hash of non-canonical files' provenance)."""
    from ltbench.method import METHODS

    content = {k: v for k, v in to_dict(config).items() if k not in NOT_FINGERPRINTED}
    content["method"] = {
        "components": sorted(METHODS.components(config.method.name)),
        "options": content["method"]["options"],
    }
    content["data_identity"] = data_identity
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
