"""MLflow as a sink behind a small interface: experiments, runs, params, metrics, artifacts.

The default store is a SQLite file, ``mlflow.db``, in the working directory, with artifacts
under ``mlruns/`` beside it (what ``mlflow ui`` in that folder shows); ``MLFLOW_TRACKING_URI``
or ``tracking.uri`` point elsewhere, for example at a tracking server.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
CHECKPOINT = "checkpoints/final.pt"


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
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.uri = tracking_uri(uri)
        self.client = MlflowClient(self.uri)

    def experiment(self, name: str) -> str:
        """The id of experiment ``name``, created if missing."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name)

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
        """Every run of the experiments as one row: status, tags, params and latest metrics."""
        rows = []
        for run in self._all_runs(experiment_ids):
            row = {
                "run_id": run.info.run_id,
                "status": run.info.status,
                "experiment_id": run.info.experiment_id,
                "end_time": run.info.end_time,
            }
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
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
