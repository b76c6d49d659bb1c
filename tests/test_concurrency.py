"""Eight processes writing runs into one new SQLite store at once lose nothing."""

from __future__ import annotations

import multiprocessing

import pytest

from ltbench.config import flatten, to_dict
from ltbench.tracking import FINISHED, PatientClient, Tracker, is_locked

from .conftest import run_config

PROCESSES = 8
EPOCHS = 25


def log_one_run(uri: str, number: int, params: dict, start: multiprocessing.Barrier) -> None:
    """What a run writes, call by call, as a parallel job of a suite would."""
    start.wait()  # all at once, onto a store that does not exist yet
    tracker = Tracker(uri)
    experiment_id = tracker.experiment("crowded")
    run_log = tracker.start_run(experiment_id, f"run-{number}", {"seed": str(number)})
    run_log.log_text(f"config of run {number}\n", "config.yaml")
    run_log.log_params(params)
    for epoch in range(1, EPOCHS + 1):
        run_log.log_metrics({"train_loss": 1 / epoch, "lr": 0.1}, step=epoch)
    run_log.log_metrics({"test_acc": float(number)}, step=EPOCHS)
    run_log.finish(FINISHED)


def test_eight_concurrent_runs_all_land_complete(tmp_path):
    uri = f"sqlite:///{tmp_path / 'crowded.db'}"
    params = flatten(to_dict(run_config()))
    context = multiprocessing.get_context("fork")  # forked before this store is ever opened
    start = context.Barrier(PROCESSES)
    workers = [
        context.Process(target=log_one_run, args=(uri, n, params, start)) for n in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * PROCESSES

    store = Tracker(uri)
    runs = store.client.search_runs(store.experiment_ids(["crowded"]))
    assert len(store.client.search_experiments()) == 2  # Default and one "crowded", not eight
    assert sorted(int(r.data.tags["seed"]) for r in runs) == list(range(PROCESSES))
    for run in runs:
        assert run.info.status == FINISHED
        assert len(run.data.params) == len(params)
        assert run.data.metrics["test_acc"] == float(run.data.tags["seed"])
        history = store.client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))


class Flaky:
    """Says "database is locked" a few times before it answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def get_run(self, run_id):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return run_id


def test_locked_calls_are_retried_and_other_errors_are_not():
    client = PatientClient(Flaky(failures=3))
    assert client.get_run("abc") == "abc"
    impatient = PatientClient(Flaky(failures=1), patience_s=0.0)
    with pytest.raises(RuntimeError, match="database is locked") as raised:
        impatient.get_run("abc")
    assert is_locked(raised.value)
    assert not is_locked(ValueError("no such run"))
