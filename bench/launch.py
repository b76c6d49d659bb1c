"""Launchers: how the runs of a suite are executed.

``inline``
    One after another in this process, each a DDP world of one (the default).
``local``
    A queue of jobs over this machine's GPUs. Each job is one run started by torchrun with
    ``gpus_per_job`` processes, one per GPU (a single process is started directly: a world of
    one); ``jobs`` of them run at once, and more jobs than
    GPU groups share the GPUs (several small jobs per GPU). Without GPUs it is a pool of
    ``jobs`` processes (``gpus_per_job`` CPU processes per run), the cores split among them.
``slurm``
    One submitit job per run. The job's tasks, ``gpus_per_job`` per node on ``nodes`` nodes,
    are the run's ranks, set up from SLURM's environment; a job that times out or is
    preempted is requeued and resumes from its checkpoint.

Whatever the launcher, runs that already finished are skipped before anything starts and an
interrupted run resumes from its checkpoint, so a suite can be stopped and started again.
Runs that share a first stage (cRT and LWS on one seed, and that first stage itself) never
run at the same time: the first trains it, the others then reuse it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ltbench.checkpoint import INTERRUPTED_EXIT
from ltbench.config import RunConfig, fingerprint, to_yaml
from ltbench.errors import ConfigError
from ltbench.method import METHODS
from ltbench.runner import RunOutcome, first_stage_run, load_data
from ltbench.tracking import Tracker, sqlite_path, tracking_uri

log = logging.getLogger(__name__)

LAUNCHERS = ("inline", "local", "slurm")
INTERRUPTED = "interrupted after a checkpoint; run the suite again to resume it"


@dataclass
class LaunchOptions:
    """How to execute a suite's runs (none of this changes a run's result or fingerprint)."""

    launcher: str = "inline"
    jobs: int | None = None  # runs at once; default: one per GPU group (local), all (slurm)
    gpus_per_job: int = 1  # GPUs per run (per node under slurm); CPU processes without GPUs
    nodes: int = 1  # slurm: nodes per run
    workdir: str = "ltbench-jobs"  # job configs, logs and results, submitit's files
    cluster: str | None = None  # submitit's cluster: None (slurm), "local" (this machine)
    partition: str | None = None  # slurm partition
    time_min: int = 24 * 60  # slurm time limit per job, minutes
    cpus_per_task: int | None = None  # slurm
    slurm: dict[str, str] = field(default_factory=dict)  # more sbatch options
    wait: bool = True  # slurm: wait for the jobs (False: submit and return)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(
                f"unknown launcher {self.launcher!r}; launchers: {', '.join(LAUNCHERS)}"
            )
        for name in ("jobs", "gpus_per_job", "nodes", "time_min"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be 1 or more, not {value}")
        if self.nodes > 1 and self.launcher != "slurm":
            raise ConfigError("runs over several nodes need --launcher slurm (or torchrun)")


@dataclass
class Job:
    """One run to launch; jobs with the same ``exclusive`` key never run at the same time."""

    config: RunConfig
    fingerprint: str
    exclusive: str
    two_stage: bool = False

    @property
    def label(self) -> str:
        config = self.config
        return f"{config.dataset.name} {config.method.name} {config.model.name} seed {config.seed}"

    @property
    def slug(self) -> str:
        config = self.config
        name = f"{config.dataset.name}-{config.method.name}-{config.model.name}-s{config.seed}"
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", name) + f"-{self.fingerprint[:8]}"


class Handle:
    """A started job: ``done()`` without blocking; then ``result()`` -> (outcome, error)."""

    def done(self) -> bool:
        raise NotImplementedError

    def result(self) -> tuple[RunOutcome | None, str | None]:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the job to checkpoint and stop (it resumes when the suite runs again)."""


Outcomes = tuple[list[RunOutcome], list[tuple[RunConfig, str]]]


def launch(runs: list[RunConfig], options: LaunchOptions, tracker: Tracker) -> Outcomes:
    """Execute ``runs`` with a ``local`` or ``slurm`` launcher; the finished ones are skipped."""
    skipped, jobs = plan(runs, tracker)
    log.info("%d runs to launch, %d already finished", len(jobs), len(skipped))
    if not jobs:
        return skipped, []
    workdir = Path(options.workdir).absolute()
    if options.launcher == "local":
        outcomes, failures = LocalLauncher(options, workdir).run(jobs)
    else:
        outcomes, failures = SlurmLauncher(options, workdir).run(jobs)
    return skipped + outcomes, failures


def plan(runs: list[RunConfig], tracker: Tracker) -> tuple[list[RunOutcome], list[Job]]:
    """The runs already finished (as skipped outcomes) and a job for each of the others, the
    runs of single-stage methods first (second stages may reuse them)."""
    identities: dict[str, str] = {}
    skipped, jobs = [], []
    for run in runs:
        config = portable(run)
        key = json.dumps(
            [config.dataset.name, config.dataset.options, config.data.root], default=str
        )
        if key not in identities:
            identities[key] = load_data(config).identity
        run_fingerprint = fingerprint(config, identities[key])
        experiment_id = tracker.experiment(config.tracking.experiment)
        done = tracker.finished_run(run_fingerprint, config.seed, [experiment_id])
        if done is not None:
            metrics = dict(done.data.metrics)
            skipped.append(RunOutcome(done.info.run_id, run_fingerprint, metrics, skipped=True))
            log.info("%s: skipped, already finished", Job(config, run_fingerprint, "").label)
            continue
        method = METHODS.compose(config.method.name, config.method.options)
        two_stage = method.second is not None
        first = first_stage_run(config, method)[0] if two_stage else config
        exclusive = f"{fingerprint(first, identities[key])}-s{config.seed}"
        jobs.append(Job(config, run_fingerprint, exclusive, two_stage))
    jobs.sort(key=lambda job: job.two_stage)
    return skipped, jobs


def portable(config: RunConfig) -> RunConfig:
    """``config`` with its store, checkpoint folder and data root as absolute paths, so a job
    started elsewhere (another folder, another node) finds them."""
    uri = tracking_uri(config.tracking.uri)
    database = sqlite_path(uri)
    if database is not None and not database.is_absolute():
        uri = f"sqlite:///{database.absolute().as_posix()}"
    root = config.data.root
    return replace(
        config,
        tracking=replace(config.tracking, uri=uri),
        train=replace(
            config.train, checkpoint_dir=str(Path(config.train.checkpoint_dir).absolute())
        ),
        data=replace(config.data, root=str(Path(root).expanduser().absolute()) if root else root),
    )


def schedule(
    jobs: list[Job],
    slots: list[Any],
    start: Callable[[Job, Any], Handle],
    poll_s: float,
) -> Outcomes:
    """Run ``jobs``, one per free slot, never two with the same exclusive key at once,
    logging a line as each ends; on Ctrl-C, ask the running jobs to checkpoint and stop."""
    waiting, running = list(jobs), {}
    free = list(slots)
    outcomes, failures = [], []
    started, total, ended = time.perf_counter(), len(jobs), 0
    try:
        while waiting or running:
            busy = {job.exclusive for job, _, _ in running.values()}
            for job in list(waiting):
                if free and job.exclusive not in busy:
                    waiting.remove(job)
                    slot = free.pop(0)
                    running[id(job)] = (job, start(job, slot), slot)
                    busy.add(job.exclusive)
            for key, (job, handle, slot) in list(running.items()):
                if not handle.done():
                    continue
                del running[key]
                free.append(slot)
                ended += 1
                outcome, error = handle.result()
                elapsed = time.perf_counter() - started
                eta = elapsed / ended * (total - ended)
                prefix = f"[{ended}/{total}] {job.label}"
                if outcome is None:
                    failures.append((job.config, error or "failed"))
                    log.error("%s: failed: %s", prefix, error)
                    continue
                outcomes.append(outcome)
                result = (
                    "skipped, already finished"
                    if outcome.skipped
                    else f"acc {outcome.metrics.get('test_acc', float('nan')):.2f} "
                    f"({outcome.seconds:.1f} s)"
                )
                log.info("%s: %s; elapsed %.0f s, about %.0f s to go", prefix, result, elapsed, eta)
            time.sleep(poll_s if running else 0)
    except KeyboardInterrupt:
        log.warning("stopping: %d running jobs checkpoint and stop", len(running))
        for _, handle, _ in running.values():
            handle.stop()
        raise
    return outcomes, failures


def outcome_from(result: dict[str, Any]) -> RunOutcome:
    return RunOutcome(
        result["run_id"],
        result["fingerprint"],
        result["metrics"],
        skipped=result["skipped"],
        seconds=result["seconds"],
    )


class LocalJob(Handle):
    """One run as a process group on this machine (torchrun's, for more than one process),
    its output in a log file."""

    def __init__(self, job: Job, folder: Path, processes: int, env: dict[str, str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        config_file = folder / "config.yaml"
        config_file.write_text(to_yaml(job.config))
        self.result_file = folder / "result.json"
        self.result_file.unlink(missing_ok=True)
        self.log_file = folder / "log.txt"
        command = [sys.executable, "-m"]
        if processes > 1:  # a world of one needs no torchrun agent: the same code path, faster
            command += ["torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
            command += ["-m"]
        command += ["ltbench.train", "--config", str(config_file)]
        command += ["--result", str(self.result_file)]
        with open(self.log_file, "ab") as output:
            self.process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=os.environ | env,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops it cleanly
            )

    def done(self) -> bool:
        return self.process.poll() is not None

    def result(self) -> tuple[RunOutcome | None, str | None]:
        result = {}
        if self.result_file.is_file():
            result = json.loads(self.result_file.read_text())
        if self.process.returncode == 0 and "run_id" in result:
            return outcome_from(result), None
        if "interrupted" in result or self.process.returncode == INTERRUPTED_EXIT:
            return None, INTERRUPTED
        if "error" in result:
            return None, result["error"]
        tail = self.log_file.read_text(errors="replace").strip().splitlines()[-5:]
        return None, (
            f"exit status {self.process.returncode}; see {self.log_file}: " + " | ".join(tail)
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()


class LocalLauncher:
    """Runs jobs as torchrun subprocesses over the GPUs of this machine (or its CPUs)."""

    def __init__(self, options: LaunchOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir

    def slots(self) -> tuple[list[dict[str, str]], int]:
        """The environment of each parallel slot (its GPUs, its CPU threads) and the number of
        processes per job."""
        per_job = self.options.gpus_per_job
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g for g in visible.split(",") if g] if visible else []
        count = torch.cuda.device_count()
        gpus = gpus[:count] if gpus else [str(i) for i in range(count)]
        if gpus and per_job > len(gpus):
            raise ConfigError(
                f"--gpus-per-job {per_job} but this machine has {len(gpus)} GPUs; "
                f"use at most {len(gpus)} (or the slurm launcher for several nodes)"
            )
        jobs = self.options.jobs or max(1, len(gpus) // per_job)
        threads = max(1, (os.cpu_count() or 1) // (jobs * per_job))
        slots = []
        for slot in range(jobs):
            env = {"OMP_NUM_THREADS": str(threads)}
            if gpus:
                chosen = [gpus[(slot * per_job + i) % len(gpus)] for i in range(per_job)]
                env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
            slots.append(env)
        where = f"{len(gpus)} GPUs" if gpus else f"the CPU ({threads} threads per process)"
        log.info("local launcher: %d jobs at once, %d processes each, on %s", jobs, per_job, where)
        return slots, per_job

    def run(self, jobs: list[Job]) -> Outcomes:
        slots, processes = self.slots()

        def start(job: Job, env: dict[str, str]) -> Handle:
            folder = self.workdir / job.config.tracking.experiment / job.slug
            return LocalJob(job, folder, processes, env)

        return schedule(jobs, slots, start, poll_s=0.5)


class SlurmRun:
    """What one SLURM job runs: one run, each task a rank. On a timeout or a preemption
    submitit calls ``checkpoint`` and requeues the job, which then resumes the run from its
    last checkpoint."""

    def __init__(self, config: RunConfig, threads: int | None = None) -> None:
        self.config = config
        self.threads = threads

    def __call__(self) -> dict[str, Any] | None:
        import submitit

        from ltbench.distributed import teardown
        from ltbench.runner import execute

        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
        if threads:
            torch.set_num_threads(threads)
        environment = submitit.helpers.TorchDistributedEnvironment()
        environment.export(set_cuda_visible_devices=False, overwrite=True)
        try:
            outcome = execute(self.config)
        finally:
            teardown()
        if environment.rank != 0:
            return None
        return {
            "run_id": outcome.run_id,
            "fingerprint": outcome.fingerprint,
            "metrics": outcome.metrics,
            "skipped": outcome.skipped,
            "seconds": outcome.seconds,
        }

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmRun(self.config, self.threads))


class SubmititJob(Handle):
    def __init__(self, job: Any) -> None:
        self.job = job

    def done(self) -> bool:
        return self.job.done()

    def result(self) -> tuple[RunOutcome | None, str | None]:
        try:
            return outcome_from(self.job.result()), None
        except Exception as error:  # noqa: BLE001 - submitit re-raises the job's own error
            text = str(error).strip().splitlines()
            if any("Interrupted" in line for line in text):
                return None, INTERRUPTED
            return None, f"job {self.job.job_id}: " + " | ".join(text[-3:])


class SlurmLauncher:
    """Submits one job per run through submitit."""

    def __init__(self, options: LaunchOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir

    def executor(self) -> Any:
        try:
            import submitit
        except ImportError:  # pragma: no cover - submitit is a dependency
            raise ConfigError("the slurm launcher needs submitit: pip install submitit") from None
        options = self.options
        cluster = options.cluster or "slurm"
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError(
                "--launcher slurm found no sbatch here: run from a SLURM login node, or add "
                "--cluster local to run the same jobs on this machine"
            )
        executor = submitit.AutoExecutor(folder=self.workdir / "submitit", cluster=cluster)
        per_node = options.gpus_per_job
        on_cpu = executor.cluster in ("local", "debug") and not torch.cuda.is_available()
        parameters: dict[str, Any] = {
            "name": "ltbench",
            "timeout_min": options.time_min,
            "nodes": options.nodes,
            "tasks_per_node": per_node,
            "gpus_per_node": 0 if on_cpu else per_node,
            "slurm_signal_delay_s": 120,  # time for the requeue before the time limit
        }
        if options.cpus_per_task:
            parameters["cpus_per_task"] = options.cpus_per_task
        if options.partition:
            parameters["slurm_partition"] = options.partition
        if options.slurm:
            parameters["slurm_additional_parameters"] = dict(options.slurm)
        executor.update_parameters(**parameters)
        return executor

    def run(self, jobs: list[Job]) -> Outcomes:
        executor = self.executor()
        log.info("submitit (%s): submitting %d jobs", executor.cluster, len(jobs))
        if not self.options.wait:
            return self.submit_all(executor, jobs)
        parallel = self.options.jobs or len(jobs)
        threads = None
        if executor.cluster in ("local", "debug"):  # share this machine's cores
            threads = max(1, (os.cpu_count() or 1) // (parallel * self.options.gpus_per_job))

        def start(job: Job, slot: Any) -> Handle:
            submitted = executor.submit(SlurmRun(job.config, threads))
            log.info("%s: job %s", job.label, submitted.job_id)
            return SubmititJob(submitted)

        poll_s = 1.0 if executor.cluster in ("local", "debug") else 30.0
        return schedule(jobs, [None] * parallel, start, poll_s)

    def submit_all(self, executor: Any, jobs: list[Job]) -> Outcomes:
        """Submit every job now; those sharing a first stage wait on each other in SLURM."""
        last: dict[str, str] = {}
        extra = dict(self.options.slurm)
        for job in jobs:
            after = last.get(job.exclusive)
            dependency = {"dependency": f"afterany:{after}"} if after else {}
            executor.update_parameters(slurm_additional_parameters=extra | dependency)
            submitted = executor.submit(SlurmRun(job.config))
            last[job.exclusive] = submitted.job_id
            log.info("%s: submitted job %s", job.label, submitted.job_id)
        log.info("submitted %d jobs; `ltbench leaderboard` shows them as they finish", len(jobs))
        return [], []
