"""Resume: a run stopped by SIGTERM or killed by SIGKILL ends exactly as if never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ltbench.checkpoint import INTERRUPTED_EXIT, atomic_save, rng_state, set_rng_state
from ltbench.cli import main
from ltbench.method import METHODS, Method
from ltbench.runner import execute

from .conftest import FAST, run_config

#: 4 epochs of 6 steps: long enough to stop in the middle, a few seconds on a CPU
RESUMABLE = ["recipe.epochs=4", "recipe.batch_size=64"]


def history(store, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store.client.get_metric_history(run_id, key))


def assert_same_run(store, resumed, reference) -> None:
    assert resumed.metrics == reference.metrics
    for key, value in reference.state.items():
        assert torch.equal(value, resumed.state[key]), key
    for key in ("train_loss", "train_acc", "lr"):
        assert history(store, resumed.run_id, key) == history(store, reference.run_id, key)


def checkpoint_file(root: Path) -> Path | None:
    found = list((root / "checkpoints").glob("*/*/resume.pt"))
    return found[0] if found else None


def wait_for_checkpoint(root: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while checkpoint_file(root) is None:
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def train_process(root: Path, args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "ltbench.train", *FAST, *args]
    return subprocess.Popen(command, cwd=root, stderr=subprocess.DEVNULL)


def test_sigkill_then_resume_equals_uninterrupted(store, tmp_path):
    reference = execute(run_config(*RESUMABLE, "tracking.experiment=reference"))
    args = [*RESUMABLE, "tracking.experiment=killed"]

    killed = train_process(tmp_path, args)
    wait_for_checkpoint(tmp_path, killed)  # the first, after epoch 1
    killed.kill()  # SIGKILL: no chance to save anything
    killed.wait(60)
    saved = torch.load(checkpoint_file(tmp_path), weights_only=True)
    assert 1 <= saved["epoch"] < 4 and saved["step"] == 0
    (run,) = store.client.search_runs(store.experiment_ids(["killed"]))
    assert run.info.status == "RUNNING" and saved["run_id"] == run.info.run_id

    resumed = execute(run_config(*args))
    assert resumed.run_id == run.info.run_id and not resumed.skipped
    assert_same_run(store, resumed, reference)
    finished = store.client.get_run(resumed.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["resumed_from"] == f"epoch {saved['epoch'] + 1}, step 1"
    assert checkpoint_file(tmp_path) is None  # deleted once the run finished
    assert len(store.client.search_runs(store.experiment_ids(["killed"]))) == 1


class SelfStopping(Method):
    """Test-only: sends this process SIGTERM in the 9th training step (epoch 2, step 3)."""

    armed = False

    def build_loss(self, ctx):
        calls = 0

        def loss(logits, targets, class_weights):
            nonlocal calls
            calls += 1
            if SelfStopping.armed and calls == 9:
                SelfStopping.armed = False
                os.kill(os.getpid(), signal.SIGTERM)
            return torch.nn.functional.cross_entropy(logits, targets)

        return loss


@pytest.fixture(scope="module", autouse=True)
def self_stopping_method():
    if "test_self_stopping" not in METHODS:
        METHODS.add("test_self_stopping", SelfStopping)


def test_sigterm_checkpoints_mid_epoch_and_resumes_at_the_step(store):
    args = [*RESUMABLE, "method.name=test_self_stopping"]
    reference = execute(run_config(*args, "tracking.experiment=reference"))

    SelfStopping.armed = True  # `ltbench train` checkpoints at the next step, exits with 75
    assert main(["train", *FAST, *args, "tracking.experiment=stopped"]) == INTERRUPTED_EXIT
    (run,) = store.client.search_runs(store.experiment_ids(["stopped"]))
    assert run.info.status == "KILLED" and "SIGTERM at epoch 2, step 5" in run.data.tags["error"]

    resumed = execute(run_config(*args, "tracking.experiment=stopped"))
    assert resumed.run_id == run.info.run_id
    finished = store.client.get_run(resumed.run_id)
    assert finished.data.tags["resumed_from"] == "epoch 2, step 5"
    assert finished.info.status == "FINISHED" and "error" not in finished.data.tags
    assert_same_run(store, resumed, reference)


def test_checkpoint_writes_are_atomic_and_rng_states_round_trip(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"generation": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("fails half-way through the write")

    with pytest.raises(RuntimeError):
        atomic_save({"generation": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"generation": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no partial file left

    state = rng_state()
    atomic_save(state, path)
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(torch.load(path, weights_only=True))
    again = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
