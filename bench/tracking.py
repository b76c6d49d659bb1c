"""MLflow as a sink behind a small interface: experiments, runs, params, metrics, artifacts.

The default store is a SQLite file, ``mlflow.db``, in the working directory, with artifacts
under ``mlruns/`` beside it (what ``mlflow ui`` in that folder shows); ``MLFLOW_TRACKING_URI``
or ``tracking.uri`` point elsewhere, for example at a tracking server.

Many processes may write to one SQLite store at once (parallel runs of a suite). SQLite lets
one writer in at a time and tells the others "database is locked" once its busy timeout
(5 s) runs out; every store call made through :class:`Tracker` and :class:`RunLog` then waits
with a growing, jittered back-off and tries again (a locked call changed nothing, so a retry
is safe), for up to ``LOCK_PATIENCE_S``. The first process to open a new store creates its
tables under a file lock, so that concurrent first opens do not race on the schema. On a
cluster, a tracking server (``mlflow server``) is the better sink: it serialises the writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd

log = logging.getLogger(__name__)

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
CHECKPOINT = "checkpoints/final.pt"

#: how long a store call keeps retrying while other processes hold the SQLite write lock
LOCK_PATIENCE_S = 600.0
LOCKED = ("database is locked", "database table is locked", "database is busy")


def is_locked(error: BaseException) -> bool:
    """Whether ``error`` says that another process held the SQLite lock."""
    text = str(error).lower()
    return any(marker in text for marker in LOCKED)


class PatientClient:
    """An MlflowClient whose calls wait and retry while the SQLite store is locked."""

    def __init__(self, client: Any, patience_s: float = LOCK_PATIENCE_S) -> None:
        self._client = client
        self._patience_s = patience_s
        self._jitter = random.Random(os.urandom(8))  # never the global RNG, which runs seed

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def patient(*args: Any, **kwargs: Any) -> Any:
            return self.call(attribute, *args, **kwargs)

        return patient

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self._patience_s
        wait = 0.05
        while True:
            try:
                return function(*args, **kwargs)
            except Exception as error:
                if not is_locked(error) or time.monotonic() + wait > deadline:
                    raise
            log.debug("store locked by another process; %s again in %.2f s", function, wait)
            time.sleep(wait * self._jitter.uniform(0.5, 1.5))
            wait = min(wait * 2, 2.0)


class _HideLockErrors(logging.Filter):
    """MLflow logs every locked call as an error with a traceback; the retry handles them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_locked(record.getMessage())


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for other stores."""
    if not uri.startswith("sqlite:"):
        return None
    path = unquote(urlparse(uri).path)[1:]  # sqlite:///relative.db, sqlite:////absolute.db
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive file lock beside a SQLite store (nothing for other stores)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tracking_uri(configured: str | None = None) -> str:
    """The store to use: the configured URI, ``MLFLOW_TRACKING_URI``, else ./mlflow.db."""
    return (
        configured
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(Path.cwd() / 'mlflow.db').as_posix()}"
    )


class Tracker:
    """One tracking store."""

    def __init__(self, uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        store_log = logging.getLogger("mlflow.store.db.utils")
        store_log.setLevel(logging.WARNING)
        if not any(isinstance(f, _HideLockErrors) for f in store_log.filters):
            store_log.addFilter(_HideLockErrors())
        self.uri = tracking_uri(uri)
        with store_lock(self.uri):  # opening a new store creates its tables
            self.client = PatientClient(MlflowClient(self.uri))

    def experiment(self, name: str) -> str:
        """The id of experiment ``name``, created if missing (by this or another process)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:
            found = self.client.get_experiment_by_name(name)  # another process was first
            if found is None:
                raise
            return found.experiment_id

    def reopen(self, run_id: str, experiment_id: str) -> RunLog | None:
        """The unfinished run ``run_id`` of this experiment, set running again to be continued;
        None when the store has no such run (another store, deleted, or finished)."""
        try:
            run = self.client.get_run(run_id)
        except Exception as error:
            if is_locked(error):
                raise
            return None
        info = run.info
        if (
            info.experiment_id != experiment_id
            or info.status == FINISHED
            or info.lifecycle_stage != "active"
        ):
            return None
        self.client.update_run(run_id, status="RUNNING")
        return RunLog(self.client, run_id)

    def experiment_ids(self, names: Iterable[str] | None = None) -> list[str]:
        if names is None:
            return [e.experiment_id for e in self.client.search_experiments()]
        ids = []
        for name in names:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                ids.append(found.experiment_id)
        return ids

    def finished_run(
        self,
        fingerprint: str,
        seed: int,
        experiment_ids: list[str],
        need_artifact: str | None = None,
    ) -> Any:
        """The newest finished run with this fingerprint and seed, if any (optionally only one
        that holds ``need_artifact``)."""
        if not experiment_ids:
            return None
        runs = self.client.search_runs(
            experiment_ids,
            filter_string=(
                f"tags.fingerprint = '{fingerprint}' and tags.seed = '{seed}' "
                f"and attributes.status = '{FINISHED}'"
            ),
            order_by=["attributes.end_time DESC"],
        )
        for run in runs:
            if need_artifact is None or self.has_artifact(run.info.run_id, need_artifact):
                return run
        return None

    def has_artifact(self, run_id: str, path: str) -> bool:
        folder, _, name = path.rpartition("/")
        return any(f.path == path for f in self.client.list_artifacts(run_id, folder or None))

    def download(self, run_id: str, path: str, destination: str) -> Path:
        return Path(self.client.download_artifacts(run_id, path, destination))

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> RunLog:
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        return RunLog(self.client, run.info.run_id)

    def runs(self, experiment_ids: list[str]) -> pd.DataFrame:
        """Every run of the experiments as one row: status, tags and latest metrics."""
        rows = []
        for run in self._all_runs(experiment_ids):
            row = {
                "run_id": run.info.run_id,
                "status": run.info.status,
                "experiment_id": run.info.experiment_id,
                "end_time": run.info.end_time,
            }
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def _all_runs(self, experiment_ids: list[str]) -> Iterable[Any]:
        token = None
        while experiment_ids:
            page = self.client.search_runs(experiment_ids, max_results=1000, page_token=token)
            yield from page
            token = page.token
            if not token:
                break


class RunLog:
    """What a run writes to the store. Only rank 0 holds one."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_file(self, local_path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), folder)

    def log_torch(self, obj: Any, path: str) -> None:
        """Save ``obj`` with torch.save as artifact ``path``."""
        import torch

        folder, _, name = path.rpartition("/")
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / name
            torch.save(obj, local)
            self.log_file(local, folder or None)

    def finish(self, status: str = FINISHED) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric ``key`` has been logged."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}


class NoRunLog(RunLog):
    """The run log of ranks other than 0: accepts everything, writes nothing."""

    def __init__(self) -> None:
        self.run_id = ""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_text(self, text: str, path: str) -> None: ...

    def log_file(self, local_path: str | Path, folder: str | None = None) -> None: ...

    def log_torch(self, obj: Any, path: str) -> None: ...

    def finish(self, status: str = FINISHED) -> None: ...

    def logged_steps(self, key: str) -> set[int]:
        return set()
