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

from ltbench.checkpoint import INTERRUPTED_EXIT, Interrupted, atomic_save, rng_state, set_rng_state
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


def wait_for_epoch(root: Path, process: subprocess.Popen, epoch: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        path = checkpoint_file(root)
        if path is not None and torch.load(path, weights_only=True)["epoch"] >= epoch:
            return
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def train_process(root: Path, args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "ltbench.train", *FAST, *args]
    return subprocess.Popen(command, cwd=root, stderr=subprocess.DEVNULL)


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(store, tmp_path):
    reference = execute(run_config(*RESUMABLE, "tracking.experiment=reference"))
    args = [*RESUMABLE, "tracking.experiment=stopped"]

    stopped = train_process(tmp_path, args)
    wait_for_epoch(tmp_path, stopped, 1)
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(60) == INTERRUPTED_EXIT  # checkpointed, then a clean exit
    (run,) = store.client.search_runs(store.experiment_ids(["stopped"]))
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["error"]
    first_stop = torch.load(checkpoint_file(tmp_path), weights_only=True)
    assert first_stop["run_id"] == run.info.run_id

    killed = train_process(tmp_path, args)
    wait_for_epoch(tmp_path, killed, first_stop["epoch"] + 1)
    killed.kill()  # SIGKILL: no chance to save anything
    killed.wait(60)
    saved = torch.load(checkpoint_file(tmp_path), weights_only=True)
    assert 1 <= saved["epoch"] < 4
    assert store.client.get_run(run.info.run_id).info.status == "RUNNING"

    resumed = execute(run_config(*args))
    assert resumed.run_id == run.info.run_id and not resumed.skipped
    assert_same_run(store, resumed, reference)
    finished = store.client.get_run(resumed.run_id)
    assert finished.info.status == "FINISHED" and "error" not in finished.data.tags
    assert finished.data.tags["resumed_from"].startswith(f"epoch {saved['epoch'] + 1}")
    assert checkpoint_file(tmp_path) is None  # deleted once the run finished
    assert len(store.client.search_runs(store.experiment_ids(["stopped"]))) == 1


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


def test_sigterm_mid_epoch_resumes_at_the_step(store):
    args = [*RESUMABLE, "method.name=test_self_stopping"]
    reference = execute(run_config(*args, "tracking.experiment=reference"))

    SelfStopping.armed = True
    with pytest.raises(Interrupted, match="epoch 2, step 5"):
        execute(run_config(*args, "tracking.experiment=stopped"))
    resumed = execute(run_config(*args, "tracking.experiment=stopped"))
    tags = store.client.get_run(resumed.run_id).data.tags
    assert tags["resumed_from"] == "epoch 2, step 5"
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
