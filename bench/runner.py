"""One run, end to end: resolve, load the data, skip if finished, train, evaluate, track.

A method with a second stage is two tracked runs: the first stage (found in the store by
fingerprint and seed, trained first only when missing) and the second, which carries the
first's run id in its ``stage1_run_id`` tag.

Under several ranks, rank 0 alone talks to the store: it takes every decision that depends on
the store (the experiment, skip or run, which first-stage run to reuse, resume or start) and
broadcasts it, so the ranks cannot disagree. A run that was interrupted continues from its
resume checkpoint in the same MLflow run (see :mod:`ltbench.checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import ltbench
from ltbench.checkpoint import Interrupted, Resume, run_folder
from ltbench.config import (
    MethodConfig,
    RecipeConfig,
    RunConfig,
    fingerprint,
    flatten,
    to_dict,
    to_yaml,
)
from ltbench.data import DATASETS, LongTailData, options_label
from ltbench.diagnostics import log_diagnostics
from ltbench.distributed import Dist, setup
from ltbench.engine import Evaluator, Stage, train_stage
from ltbench.errors import DataError
from ltbench.method import METHODS, TRAIN_STAGE, Composed, MethodContext
from ltbench.metrics import per_class_table, summarize
from ltbench.models import MODELS
from ltbench.tracking import CHECKPOINT, FAILED, FINISHED, KILLED, NoRunLog, RunLog, Tracker

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What a run left: its id, fingerprint, final metrics, and whether it was skipped."""

    run_id: str
    fingerprint: str
    metrics: dict[str, float]
    skipped: bool = False
    seconds: float = 0.0
    state: dict[str, Any] | None = None


def load_data(config: RunConfig) -> LongTailData:
    plugin = DATASETS.get(config.dataset.name)(**config.dataset.options)
    return plugin.load(
        root=config.data.root,
        download=config.data.download,
        allow_noncanonical=config.data.allow_noncanonical,
    )


def execute(
    config: RunConfig, tracker: Tracker | None = None, data: LongTailData | None = None
) -> RunOutcome:
    """Run ``config`` unless a finished run with its fingerprint and seed is in its experiment."""
    dist = setup(config.train.device)
    if dist.is_main:
        tracker = tracker or Tracker(config.tracking.uri)
    method = METHODS.compose(config.method.name, config.method.options)
    data = data or load_data(config)
    run_fingerprint = fingerprint(config, data.identity)
    experiment_id = _experiment(tracker, config.tracking.experiment, dist)

    done = None
    if dist.is_main:
        found = tracker.finished_run(run_fingerprint, config.seed, [experiment_id])
        done = found and (found.info.run_id, dict(found.data.metrics))
    done = dist.from_main(done)
    if done:
        return RunOutcome(done[0], run_fingerprint, done[1], skipped=True)
    return _run(config, method, data, dist, tracker, experiment_id, run_fingerprint)


def _run(
    config: RunConfig,
    method: Composed,
    data: LongTailData,
    dist: Dist,
    tracker: Tracker,
    experiment_id: str,
    run_fingerprint: str,
) -> RunOutcome:
    if method.second is None:
        body = functools.partial(_first_stage, config, method, data, dist)
        return _tracked(config, data, run_fingerprint, experiment_id, tracker, dist, body, {})

    stage1 = _stage1_state(config, method, data, dist, tracker, experiment_id)
    body = functools.partial(_second_stage, config, method, data, dist, stage1.state)
    tags = {"stage1_run_id": stage1.run_id, "stage1_fingerprint": stage1.fingerprint}
    return _tracked(config, data, run_fingerprint, experiment_id, tracker, dist, body, tags)


def _experiment(tracker: Tracker | None, name: str, dist: Dist) -> str:
    return dist.from_main(tracker.experiment(name) if dist.is_main else None)


def _tracked(
    config: RunConfig,
    data: LongTailData,
    run_fingerprint: str,
    experiment_id: str,
    tracker: Tracker,
    dist: Dist,
    body: Any,
    extra_tags: dict[str, str],
) -> RunOutcome:
    started = time.perf_counter()
    tags = run_tags(config, data, run_fingerprint, dist) | extra_tags
    name = f"{config.dataset.name}-{config.method.name}-{config.model.name}-s{config.seed}"
    resume = None
    if config.train.resume:
        folder = run_folder(
            config.train.checkpoint_dir, config.tracking.experiment, run_fingerprint, config.seed
        )
        resume = Resume(folder)
    with resume.hold(dist) if resume is not None else contextlib.nullcontext():
        run_log = _reopen(tracker, experiment_id, resume) if dist.is_main else NoRunLog()
        if run_log is None:
            run_log = tracker.start_run(experiment_id, name, tags)
            run_log.log_text(to_yaml(config), "config.yaml")
            run_log.log_params(flatten(to_dict(config)) | {"data.identity": data.identity})
        if resume is not None:
            resume.run_id = run_log.run_id
        try:
            metrics, state = body(run_log, resume)
        except BaseException as error:
            interrupted = (KeyboardInterrupt, SystemExit, Interrupted)
            status = KILLED if isinstance(error, interrupted) else FAILED
            run_log.set_tags({"error": f"{type(error).__name__}: {error}"[:4000]})
            run_log.finish(status)
            raise
        run_log.finish(FINISHED)
        if resume is not None and dist.is_main:
            resume.discard(finished=True)
    return RunOutcome(
        run_log.run_id, run_fingerprint, metrics, seconds=time.perf_counter() - started, state=state
    )


def _reopen(tracker: Tracker, experiment_id: str, resume: Resume | None) -> RunLog | None:
    """The interrupted MLflow run to continue when a resume checkpoint names one; else None
    (and a checkpoint whose run cannot be continued is deleted: the run starts afresh)."""
    saved = resume.saved() if resume is not None else None
    if saved is None:
        return None
    run_log = tracker.reopen(saved["run_id"], experiment_id)
    if run_log is None:
        log.warning("checkpoint %s names no unfinished run here; starting afresh", resume.path)
        resume.discard()
        return None
    if "error" in run_log.client.get_run(run_log.run_id).data.tags:
        run_log.client.delete_tag(run_log.run_id, "error")  # the interruption's, now over
    run_log.set_tags({"resumed_from": f"epoch {saved['epoch'] + 1}, step {saved['step'] + 1}"})
    log.info("continuing run %s from %s", run_log.run_id, resume.path)
    return run_log


def run_tags(
    config: RunConfig, data: LongTailData, run_fingerprint: str, dist: Dist
) -> dict[str, str]:
    options = options_label(config.dataset.options)
    return {
        "dataset": config.dataset.name,
        "dataset_label": f"{config.dataset.name} ({options})" if options else config.dataset.name,
        "method": config.method.name,
        "backbone": config.model.name,
        "seed": str(config.seed),
        "fingerprint": run_fingerprint,
        "data_canonical": str(data.canonical).lower(),
        "ltbench_version": ltbench.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": str(dist.device),
        "world_size": str(dist.world_size),
    } | {f"data.{k}": v for k, v in data.provenance.items()}


@functools.cache
def git_commit() -> str:
    """The commit of the ltbench checkout this runs from ("" when installed from a wheel)."""
    source = Path(ltbench.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("-dirty" if dirty else "")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_model(
    config: RunConfig, data: LongTailData, method: Composed, ctx: MethodContext
) -> nn.Module:
    model = MODELS.build(config.model.name, data.num_classes, data.in_chans, config.model.options)
    return method.adapt_model(model, ctx)


def _context(
    config: RunConfig, data: LongTailData, dist: Dist, stage: str, recipe: RecipeConfig
) -> MethodContext:
    return MethodContext(
        num_classes=data.num_classes,
        class_counts=data.class_counts,
        epochs=recipe.epochs,
        stage=stage,
        seed=config.seed,
        device=dist.device,
        recipe=recipe,
    )


def _to_device(model: nn.Module, config: RunConfig, dist: Dist) -> nn.Module:
    model = model.to(dist.device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _first_stage(
    config: RunConfig,
    method: Composed,
    data: LongTailData,
    dist: Dist,
    run_log: RunLog,
    resume: Resume | None = None,
) -> tuple[dict[str, float], dict]:
    seed_everything(config.seed)
    ctx = _context(config, data, dist, TRAIN_STAGE, config.recipe)
    model = _to_device(_build_model(config, data, method, ctx), config, dist)
    stage = Stage(method, ctx, config.recipe)
    return _train_and_finish(config, data, dist, run_log, model, stage, resume=resume)


def _second_stage(
    config: RunConfig,
    method: Composed,
    data: LongTailData,
    dist: Dist,
    stage1_state: dict,
    run_log: RunLog,
    resume: Resume | None = None,
) -> tuple[dict[str, float], dict]:
    seed_everything(config.seed)
    first = method.first_stage()
    model = _build_model(
        config, data, first, _context(config, data, dist, TRAIN_STAGE, config.recipe)
    )
    model.load_state_dict(stage1_state)
    name, spec = method.second
    recipe = dataclasses.replace(config.recipe, epochs=max(spec.epochs, 1), **spec.recipe)
    ctx = _context(config, data, dist, method.stage_of[name], recipe)
    model = method.adapt_model(model, ctx)
    if spec.freeze_backbone:
        model.backbone.requires_grad_(False)
    model = _to_device(model, config, dist)
    stage = Stage(method, ctx, recipe, freeze_backbone=spec.freeze_backbone)
    return _train_and_finish(
        config, data, dist, run_log, model, stage, train=spec.epochs > 0, resume=resume
    )


def _train_and_finish(
    config: RunConfig,
    data: LongTailData,
    dist: Dist,
    run_log: RunLog,
    model: nn.Module,
    stage: Stage,
    train: bool = True,
    resume: Resume | None = None,
) -> tuple[dict[str, float], dict]:
    """Train the stage, checkpoint, apply a post-hoc transform, evaluate on test, log it all."""
    batch = max(1, stage.recipe.batch_size // dist.world_size)
    test = Evaluator(data.test, data, dist, config.train, batch, stage.recipe)
    groups = data.shot_groups

    def evaluate_test(epoch: int) -> None:
        run_log.log_metrics(summarize(test(model), groups, "test"), step=epoch)

    if train:
        train_stage(
            model, data, stage, config.train, dist, run_log, config.seed, evaluate_test, resume
        )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if config.train.checkpoint:
        run_log.log_torch({"model": state, "config": to_dict(config)}, CHECKPOINT)
    model = _posthoc(model, data, dist, run_log, stage, config, batch)

    tally = test(model)
    metrics = summarize(tally, groups, "test")
    run_log.log_metrics(metrics, step=stage.recipe.epochs if train else 0)
    table = per_class_table(tally, data.class_counts, data.class_names, groups)
    run_log.log_text(table.to_csv(index=False), "per_class.csv")
    if dist.is_main:
        log.info("test: %s", ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    if config.train.diagnostics:
        step = stage.recipe.epochs if train else 0
        title = f"{config.dataset.name} {config.method.name} {config.model.name} seed {config.seed}"
        log_diagnostics(model, test, data, run_log, step, title)
    return metrics, state


def _posthoc(
    model: nn.Module,
    data: LongTailData,
    dist: Dist,
    run_log: RunLog,
    stage: Stage,
    config: RunConfig,
    batch: int,
) -> nn.Module:
    component = stage.method.posthoc_component(stage.ctx.stage)
    if component is None:
        return model
    if data.val is None:
        raise DataError(
            f"method {config.method.name!r} chooses its post-hoc setting on a val split, but data "
            f"set {config.dataset.name!r} has none; use a data set with a val split"
        )
    val = Evaluator(data.val, data, dist, config.train, batch, stage.recipe)
    result = component.posthoc(model, lambda m: val(m).per_class_accuracy, stage.ctx)
    run_log.log_params({f"posthoc.{k}": v for k, v in result.chosen.items()})
    if result.curve:
        run_log.log_text(pd.DataFrame(result.curve).to_csv(index=False), "posthoc_curve.csv")
    return result.model


def _stage1_state(
    config: RunConfig,
    method: Composed,
    data: LongTailData,
    dist: Dist,
    tracker: Tracker,
    experiment_id: str,
) -> RunOutcome:
    """The first stage's trained weights: from its finished run in the store (this experiment
    first, then any), or trained now as its own tracked run when there is none."""
    stage1_config, first = first_stage_run(config, method)
    stage1_fingerprint = fingerprint(stage1_config, data.identity)
    reused = dist.from_main(
        _finished_stage1(tracker, experiment_id, stage1_fingerprint, config.seed)
        if dist.is_main
        else None
    )
    if reused is not None:
        run_id, state = reused
        log.info("stage 1: reusing run %s", run_id)
        return RunOutcome(run_id, stage1_fingerprint, {}, True, state=state)
    log.info(
        "stage 1: no finished run with fingerprint %s, seed %d; training it first",
        stage1_fingerprint,
        config.seed,
    )
    return _run(stage1_config, first, data, dist, tracker, experiment_id, stage1_fingerprint)


def first_stage_run(config: RunConfig, method: Composed) -> tuple[RunConfig, Composed]:
    """The config and method of the first-stage run that a two-stage method starts from."""
    first = method.first_stage()
    if not first.components:
        first = METHODS.compose("ce")
    stage1_config = dataclasses.replace(
        config, method=MethodConfig(name=first.spec, options=dict(first.options))
    )
    return stage1_config, first


def _finished_stage1(
    tracker: Tracker, experiment_id: str, stage1_fingerprint: str, seed: int
) -> tuple[str, dict] | None:
    """Rank 0: the run id and weights of a finished first stage (this experiment first)."""
    others = [e for e in tracker.experiment_ids() if e != experiment_id]
    for experiments in ([experiment_id], others):
        found = tracker.finished_run(stage1_fingerprint, seed, experiments, CHECKPOINT)
        if found is not None:
            with tempfile.TemporaryDirectory() as scratch:
                path = tracker.download(found.info.run_id, CHECKPOINT, scratch)
                state = torch.load(path, map_location="cpu", weights_only=True)["model"]
            return found.info.run_id, state
    return None
