"""Launchers: a suite as parallel local processes, as submitit jobs, and their scheduling."""

from __future__ import annotations

import pytest
import torch

from ltbench.cli import main
from ltbench.errors import ConfigError
from ltbench.launch import Handle, LaunchOptions, LocalLauncher, plan, schedule
from ltbench.method import METHODS, Method, SecondStage

from .conftest import run_config

SUITE = [
    "run",
    "default",
    "recipe.epochs=2",
    "recipe.warmup_epochs=1",
    "seeds=[0,1]",
    "methods=[ce]",
]


def finished_runs(store, experiment):
    runs = store.client.search_runs(store.experiment_ids([experiment]))
    return sorted(
        (r for r in runs if r.info.status == "FINISHED"), key=lambda r: r.data.tags["seed"]
    )


def test_local_launcher_runs_jobs_in_parallel_then_skips_them(store, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="ltbench")
    workdir = tmp_path / "jobs"
    args = [*SUITE, "--launcher", "local", "--jobs", "2", "--workdir", str(workdir)]
    assert main(args) == 0
    assert "| 2 " in capsys.readouterr().out
    runs = finished_runs(store, "default")
    assert [r.data.tags["seed"] for r in runs] == ["0", "1"]
    assert all(r.data.metrics["test_count"] == 400 for r in runs)
    logs = sorted(workdir.glob("default/*/log.txt"))
    assert len(logs) == 2 and all("test_count 400" in log.read_text() for log in logs)
    assert "2 jobs at once" in caplog.text

    caplog.clear()
    assert main(args) == 0  # nothing left to run: no process is started
    assert "0 runs to launch, 2 already finished" in caplog.text
    assert len(store.client.search_runs(store.experiment_ids(["default"]))) == 2


def test_submitit_local_executor_runs_a_two_job_suite(store, tmp_path, capsys):
    workdir = tmp_path / "jobs"
    args = [*SUITE, "--launcher", "slurm", "--cluster", "local", "--workdir", str(workdir)]
    assert main(args) == 0
    assert "| 2 " in capsys.readouterr().out
    runs = finished_runs(store, "default")
    assert [r.data.tags["seed"] for r in runs] == ["0", "1"]
    assert all(r.data.tags["world_size"] == "1" for r in runs)
    assert len(list((workdir / "submitit").glob("*_result.pkl"))) == 2


class Retrain(Method):
    """Test-only: a second stage on top of cross-entropy, like cRT."""

    def second_stage(self):
        return SecondStage("retrain", epochs=1)


@pytest.fixture(scope="module", autouse=True)
def two_stage_method():
    if "test_retrain" not in METHODS:
        METHODS.add("test_retrain", Retrain)


class Finished(Handle):
    def __init__(self, job, log):
        self.job, self.log = job, log
        log.append(("start", job.config.method.name, job.config.seed))

    def done(self):
        self.log.append(("end", self.job.config.method.name, self.job.config.seed))
        return True

    def result(self):
        return None, "not run"


def test_runs_sharing_a_first_stage_never_run_at_once(store):
    runs = [
        run_config(f"method.name={m}", f"seed={s}") for m in ("test_retrain", "ce") for s in (0, 1)
    ]
    skipped, jobs = plan(runs, store)
    assert skipped == []
    assert [j.config.method.name for j in jobs] == ["ce", "ce", "test_retrain", "test_retrain"]
    assert jobs[0].exclusive == jobs[2].exclusive != jobs[1].exclusive == jobs[3].exclusive

    events = []
    _, failures = schedule(jobs, [0, 1, 2, 3], lambda job, slot: Finished(job, events), 0)
    assert len(failures) == 4
    # ce seed 0 and seed 1 start together; each retrain waits for the ce of its seed
    assert events[:2] == [("start", "ce", 0), ("start", "ce", 1)]
    for seed in (0, 1):
        assert events.index(("end", "ce", seed)) < events.index(("start", "test_retrain", seed))


def test_local_slots_spread_jobs_over_gpus(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    slots, processes = LocalLauncher(LaunchOptions("local", gpus_per_job=2), tmp_path).slots()
    assert processes == 2 and [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]
    shared = LocalLauncher(LaunchOptions("local", jobs=8), tmp_path).slots()[0]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in shared] == ["0", "1", "2", "3"] * 2
    with pytest.raises(ConfigError, match="has 4 GPUs"):
        LocalLauncher(LaunchOptions("local", gpus_per_job=8), tmp_path).slots()
    with pytest.raises(ConfigError, match="unknown launcher 'pbs'"):
        LaunchOptions("pbs")


def test_slurm_launcher_without_sbatch_says_what_to_do(store, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main([*SUITE, "--launcher", "slurm"]) == 2
    assert "found no sbatch here" in capsys.readouterr().err
    assert store.client.search_runs(store.experiment_ids(["default"])) == []
