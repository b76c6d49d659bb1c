"""Suites: YAML lists of data sets x backbones x methods x seeds, expanded into runs.

A suite file holds the fields of :class:`SuiteConfig`; its ``config`` section is a run-config
layer applied to every run. Command-line ``key=value`` overrides address the suite's own
fields (``seeds=[0]``, ``methods=[ce]``) or, for any other key, every run's config
(``recipe.epochs=5``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ltbench.config import RunConfig, merge_layers, parse_overrides, resolve_run, to_dict
from ltbench.errors import ConfigError, LtbenchError
from ltbench.launch import LaunchOptions, launch
from ltbench.runner import RunOutcome, execute, load_data
from ltbench.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class SuiteConfig:
    """A suite: what to run, crossed, and a config layer for every run."""

    name: str = "suite"
    description: str = ""
    experiment: str | None = None
    datasets: list[Any] = field(default_factory=lambda: ["digits_lt"])
    models: list[Any] = field(default_factory=list)
    methods: list[Any] = field(default_factory=lambda: ["ce"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteResult:
    outcomes: list[RunOutcome]
    failures: list[tuple[RunConfig, str]]
    fingerprints: set[str]
    experiment: str


def packaged_suites() -> list[str]:
    folder = resources.files("ltbench.suites")
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def suite_text(name_or_path: str) -> tuple[str, str]:
    """The YAML text of a packaged suite or a suite file, and where it came from."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(
                f"suite file {name_or_path!r} does not exist; give a path to a suite YAML file "
                f"or a packaged suite: {', '.join(packaged_suites())}"
            )
        return path.read_text(), f"suite file {path}"
    if name_or_path not in packaged_suites():
        raise ConfigError(
            f"no suite {name_or_path!r}: not a file, and not a packaged suite "
            f"({', '.join(packaged_suites())})"
        )
    text = resources.files("ltbench.suites").joinpath(f"{name_or_path}.yaml").read_text()
    return text, f"packaged suite {name_or_path!r}"


SUITE_KEYS = {f.name for f in dataclasses.fields(SuiteConfig)} - {"config"}


def load_suite(name_or_path: str, overrides: list[str] = ()) -> tuple[SuiteConfig, Any]:
    """The suite with suite-level overrides applied, and the run-level override layer."""
    text, source = suite_text(name_or_path)
    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{source} must be a mapping of suite fields")
    parsed = OmegaConf.to_container(parse_overrides(list(overrides)))
    suite_layer = {k: v for k, v in parsed.items() if k in SUITE_KEYS}
    _names_select_entries(parsed, suite_layer)
    run_layer = OmegaConf.create({k: v for k, v in parsed.items() if k not in SUITE_KEYS})
    merged = merge_layers(SuiteConfig, [(source, content), ("the command line", suite_layer)])
    suite: SuiteConfig = OmegaConf.to_object(merged)
    return suite, run_layer


#: run-config keys that name what a suite crosses: on the command line they pick the suite's
#: entries (``method.name=ldam_drw`` runs LDAM-DRW alone), instead of renaming every run
ENTRY_KEYS = {"dataset": "datasets", "model": "models", "method": "methods"}


def _names_select_entries(parsed: dict[str, Any], suite_layer: dict[str, Any]) -> None:
    """Move ``dataset.name``, ``model.name``, ``method.name`` and ``seed`` overrides from the
    run layer to the suite's own fields, so that they select rather than duplicate runs."""
    chosen: dict[str, tuple[str, Any]] = {}
    for section, suite_field in ENTRY_KEYS.items():
        value = parsed.get(section)
        if isinstance(value, dict) and "name" in value:
            chosen[suite_field] = (f"{section}.name", value.pop("name"))
            if not value:
                del parsed[section]
    if "seed" in parsed:
        chosen["seeds"] = ("seed", parsed.pop("seed"))
    for suite_field, (key, value) in chosen.items():
        if suite_field in suite_layer:
            raise ConfigError(
                f"the command line sets both {key} and {suite_field}; give one of them "
                f"(e.g. {suite_field}=[{value}])"
            )
        suite_layer[suite_field] = [value]


def _entry(entry: Any, kind: str) -> dict[str, Any]:
    """A suite entry, ``name`` or ``{name: ..., options: {...}}``, as a config section."""
    if isinstance(entry, str):
        return {"name": entry}
    if isinstance(entry, dict) and "name" in entry and set(entry) <= {"name", "options"}:
        return {"name": entry["name"], "options": entry.get("options") or {}}
    raise ConfigError(f"suite {kind} entry {entry!r} must be a name or {{name:, options:}}")


def expand(suite: SuiteConfig, run_layer: Any) -> list[RunConfig]:
    """Every run of the suite, resolved and validated before any of them starts."""
    if not (suite.datasets and suite.methods and suite.seeds):
        raise ConfigError("a suite needs at least one data set, one method and one seed")
    experiment = suite.experiment or suite.name
    runs: list[RunConfig] = []
    seen: set[str] = set()
    for dataset in suite.datasets:
        for model in suite.models or [None]:
            for method in suite.methods:
                for seed in suite.seeds:
                    entry = {
                        "dataset": _entry(dataset, "datasets"),
                        "method": _entry(method, "methods"),
                        "seed": seed,
                        "tracking": {"experiment": experiment},
                    }
                    if model is not None:
                        entry["model"] = _entry(model, "models")
                    config = resolve_run(
                        [
                            (f"suite {suite.name!r} (its config section)", suite.config),
                            (f"suite {suite.name!r}", entry),
                            ("the command line", run_layer),
                        ]
                    )
                    identity = json.dumps(to_dict(config), sort_keys=True, default=str)
                    if identity in seen:
                        log.warning(
                            "suite %s lists %s %s seed %d twice; it runs once",
                            suite.name,
                            config.dataset.name,
                            config.method.name,
                            config.seed,
                        )
                        continue
                    seen.add(identity)
                    runs.append(config)
    return runs


def run_suite(
    suite: SuiteConfig, run_layer: Any, launch_options: LaunchOptions | None = None
) -> SuiteResult:
    """Run every run of the suite, skipping finished ones, and report progress: in turn in
    this process, or with the launcher of ``launch_options`` (local processes, SLURM).

    A run that fails (a NaN loss, bad data) is recorded as failed in the store and reported;
    the others go on, and no finished run is touched.
    """
    runs = expand(suite, run_layer)
    tracker = Tracker(runs[0].tracking.uri)
    data_cache: dict[str, Any] = {}
    outcomes, failures = [], []
    started = time.perf_counter()
    log.info(
        "suite %s: %d %s into experiment %r of %s",
        suite.name,
        len(runs),
        "run" if len(runs) == 1 else "runs",
        runs[0].tracking.experiment,
        tracker.uri,
    )
    if launch_options is not None and launch_options.launcher != "inline":
        outcomes, failures = launch(runs, launch_options, tracker)
        fingerprints = {o.fingerprint for o in outcomes}
        return SuiteResult(outcomes, failures, fingerprints, runs[0].tracking.experiment)
    for number, config in enumerate(runs, 1):
        label = (
            f"[{number}/{len(runs)}] {config.dataset.name} {config.method.name} "
            f"{config.model.name} seed {config.seed}"
        )
        key = json.dumps(
            [config.dataset.name, config.dataset.options, config.data.root],
            sort_keys=True,
            default=str,
        )
        try:
            if key not in data_cache:
                data_cache[key] = load_data(config)
            outcome = execute(config, tracker, data_cache[key])
        except LtbenchError as error:
            failures.append((config, str(error)))
            log.error("%s: failed: %s", label, error)
            continue
        outcomes.append(outcome)
        elapsed = time.perf_counter() - started
        eta = elapsed / number * (len(runs) - number)
        result = (
            "skipped, already finished"
            if outcome.skipped
            else f"acc {outcome.metrics.get('test_acc', float('nan')):.2f} "
            f"({outcome.seconds:.1f} s)"
        )
        log.info("%s: %s; elapsed %.0f s, about %.0f s to go", label, result, elapsed, eta)
    fingerprints = {o.fingerprint for o in outcomes}
    return SuiteResult(outcomes, failures, fingerprints, runs[0].tracking.experiment)
