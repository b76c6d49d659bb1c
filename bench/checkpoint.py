"""Resume checkpoints: a run's whole training state, saved after every epoch and on SIGTERM.

A checkpoint holds the model, the optimizer, the position in the schedule (the epoch, and the
step within it when SIGTERM stopped the run mid-epoch, with that epoch's partial sums), every
rank's random number generator states (python, numpy, torch CPU and CUDA) and the MLflow run
id. The learning rate, the sample order and the augmentation are functions of (seed, epoch),
so the epoch is the position of the scheduler and of the sampler. Rank 0 writes the file
atomically (a temporary file in the same folder, then ``os.replace``), so a crash or SIGKILL
at any moment leaves either the previous checkpoint or the new one, never half a file.

Checkpoints live outside MLflow, in ``train.checkpoint_dir`` (default ``checkpoints/`` in the
working directory), one folder per run: ``<experiment>/<fingerprint>-s<seed>/resume.pt``.
They are scratch state, rewritten every epoch and deleted once the run finishes (its final
weights are an MLflow artifact); MLflow artifact stores are write-once and often remote,
which suits neither. On a cluster, point ``train.checkpoint_dir`` at a shared file system so
that a requeued job finds it on another node.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed
from torch import nn

from ltbench.distributed import Dist
from ltbench.errors import TrainingError

log = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"
LOCK_FILE = ".lock"

#: exit status of a process that checkpointed on SIGTERM and stopped (EX_TEMPFAIL: try again)
INTERRUPTED_EXIT = 75


class Interrupted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint; running it again resumes it."""


def run_folder(checkpoint_dir: str, experiment: str, fingerprint: str, seed: int) -> Path:
    """The folder of one run's resume checkpoint (the experiment name made filename-safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return Path(checkpoint_dir).expanduser().absolute() / safe / f"{fingerprint}-s{seed}"


def rng_state() -> dict[str, Any]:
    """Every random number generator state of this process, in types torch.load accepts
    with ``weights_only=True``."""
    numpy_state = np.random.get_state(legacy=False)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    key = saved["key"].numpy().astype(np.uint32)
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": key, "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that the file is always either the old or the new one."""
    _atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda file: file.write(text.encode()))


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


@dataclass
class Progress:
    """Where a resumed stage picks up: ``epoch`` (0-based, the next to run or the one under
    way), ``step`` batches of it already done, and that epoch's partial sums."""

    epoch: int
    step: int
    totals: torch.Tensor | None
    first_bad: torch.Tensor | None


class Resume:
    """One run's resume checkpoint. Rank 0 alone reads and writes the file; the other ranks
    receive what it read, so the folder need not be shared between nodes."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RESUME_FILE
        self.run_id = ""
        self.watch = SigtermWatch()
        self._saved: dict[str, Any] | None = None
        self._read = False

    def saved(self) -> dict[str, Any] | None:
        """The checkpoint on disk (rank 0), read once; None when there is none or it is
        unreadable (a warning says why, and the run starts from scratch)."""
        if not self._read:
            self._read = True
            if self.path.is_file():
                try:
                    self._saved = torch.load(self.path, map_location="cpu", weights_only=True)
                except Exception as error:  # noqa: BLE001 - any unreadable file means: start over
                    log.warning("ignoring unreadable checkpoint %s: %s", self.path, error)
        return self._saved

    @contextlib.contextmanager
    def hold(self, dist: Dist) -> Iterator[None]:
        """While the run trains: note SIGTERM instead of dying, and (rank 0) hold the run's
        folder lock, so that a second process training the same run at the same time (same
        experiment, fingerprint and seed) is refused instead of sharing its checkpoint."""
        with self.watch, contextlib.ExitStack() as held:
            if dist.is_main:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                lock = held.enter_context(open(self.path.parent / LOCK_FILE, "a"))
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise TrainingError(
                        f"another process is training this run now (it holds {lock.name}); "
                        "wait for it, or give this one another tracking.experiment"
                    ) from None
            yield

    def discard(self, finished: bool = False) -> None:
        """Forget and delete the checkpoint (rank 0): the run starts afresh, or (``finished``)
        it is over, and its folder goes too."""
        self._saved, self._read = None, True
        self.path.unlink(missing_ok=True)
        if not finished:
            return
        (self.path.parent / LOCK_FILE).unlink(missing_ok=True)
        for folder in (self.path.parent, self.path.parent.parent):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (another run's checkpoint), or already gone

    def restore(self, dist: Dist) -> dict[str, Any] | None:
        """Rank 0's checkpoint on every rank, with this rank's own RNG states and partial
        sums under ``"rng"``, ``"totals"`` and ``"first_bad"``."""
        saved = dist.from_main(self.saved() if dist.is_main else None)
        if saved is None:
            return None
        ranks = saved.pop("ranks")
        if saved["world_size"] != dist.world_size:
            log.warning(
                "resuming a run checkpointed with %d processes on %d: its sample shards and "
                "per-rank batches change, so it will not match an uninterrupted run exactly",
                saved["world_size"],
                dist.world_size,
            )
        saved.update(ranks[dist.rank] if dist.rank < len(ranks) else ranks[0])
        if dist.rank >= len(ranks) and saved["totals"] is not None:  # a new rank: nothing done
            saved["totals"], saved["first_bad"] = saved["totals"] * 0, saved["first_bad"] * 0 - 1
        return saved

    def save(
        self,
        dist: Dist,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        progress: Progress,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Checkpoint the stage (a collective: every rank adds its RNG states and, mid-epoch,
        its partial sums of the epoch)."""
        own = {
            "rng": rng_state(),
            "totals": None if progress.totals is None else progress.totals.cpu(),
            "first_bad": None if progress.first_bad is None else progress.first_bad.cpu(),
        }
        ranks = dist.gather(own)
        if not dist.is_main:
            return
        atomic_save(
            {
                "run_id": self.run_id,
                "epoch": progress.epoch,
                "step": progress.step,
                "metrics": metrics or {},
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "world_size": dist.world_size,
                "ranks": ranks,
            },
            self.path,
        )


def apply(saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a restored checkpoint into the model and optimizer and reset this rank's RNGs."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])


class SigtermWatch:
    """Notes SIGTERM while a stage trains (instead of dying), so the loop can checkpoint and
    stop between two steps; the previous handler comes back afterwards."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def __enter__(self) -> SigtermWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True


class StopVote:
    """All ranks agree to stop at the same step once any of them got SIGTERM.

    A vote is cast at each step and read at the next one; under several ranks it is an
    asynchronous sum over a CPU (gloo) group, so it neither stalls the GPU nor adds a wait.
    """

    def __init__(self, watch: SigtermWatch, dist: Dist) -> None:
        self.watch = watch
        self.dist = dist
        self._ballot: torch.Tensor | None = None
        self._work: Any = None

    def poll(self) -> bool:
        """Whether the previous vote said stop; if not, cast the next one."""
        if self.decided():
            return True
        self._ballot = torch.tensor([float(self.watch.received)])
        if self.dist.world_size > 1:
            self._work = torch.distributed.all_reduce(
                self._ballot, group=self.dist.control, async_op=True
            )
        return False

    def decided(self) -> bool:
        """Read the pending vote (if any): True when some rank asked to stop."""
        if self._ballot is None:
            return False
        if self._work is not None:
            self._work.wait()
            self._work = None
        stop = bool(self._ballot.item() > 0)
        self._ballot = None
        return stop
