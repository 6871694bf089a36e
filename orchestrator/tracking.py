"""MLflow tracking: one parent run per job, a nested run per worker.

Metric keys name their owner (the scheme is ``strategies.base``'s):
``block-1/train/local_loss`` goes to the nested run ``block-1`` as ``train/local_loss``;
keys without a worker prefix (``train/loss``, ``eval/accuracy``) go to the parent. Steps
at or below the highest step already logged are skipped, so a run that replays steps
after restoring a checkpoint never logs a step twice.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.errors import UserError
from orchestrator.locations import job_submission_id

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from orchestrator.config import RunConfig

log = logging.getLogger(__name__)

WORKER_KEY = re.compile(r"^(?P<worker>[a-z]+-\d+)/(?P<metric>.+)$")
DEFAULT_DB = "mlruns.db"
URI_ENV = "MLFLOW_TRACKING_URI"


def default_tracking_uri(configured: str | None) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, then a SQLite file in the working directory."""
    if configured:
        return configured
    if os.environ.get(URI_ENV):
        return os.environ[URI_ENV]
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``section.key`` params; MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def split_by_worker(metrics: dict[str, float]) -> dict[str | None, dict[str, float]]:
    """Group metric keys by the worker that owns them (None: the parent run)."""
    groups: dict[str | None, dict[str, float]] = {}
    for key, value in metrics.items():
        match = WORKER_KEY.match(key)
        owner, name = (match["worker"], match["metric"]) if match else (None, key)
        groups.setdefault(owner, {})[name] = float(value)
    return groups


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Tracker:
    """The run's MLflow record; the controller is its only writer."""

    def __init__(self, config: RunConfig, ray_address: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.config = config
        self.uri = default_tracking_uri(config.tracking.uri)
        # MLflow's fluent API (which runs the system-metrics monitor) needs the URI set
        # globally, and exports it as $MLFLOW_TRACKING_URI; ``finish`` puts back what was
        # there, so a second run in the same process (a notebook) is not sent here.
        self._exported = os.environ.get(URI_ENV)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.ray_address = ray_address
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.nested: dict[str, str] = {}
        self.logged_step = -1

    def _experiment(self) -> str:
        name = self.config.tracking.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///") and self.config.tracking.uri is None:
            # Beside the default SQLite file, not wherever the process happens to run later.
            artifacts = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def start(self, resume_run_id: str | None = None) -> str:
        from mlflow.exceptions import MlflowException

        self.experiment_id = self._experiment()
        try:
            run = self._mlflow.start_run(
                run_id=resume_run_id,
                experiment_id=None if resume_run_id else self.experiment_id,
                run_name=None if resume_run_id else self.config.run_name,
                log_system_metrics=self.config.tracking.system_metrics,
            )
        except MlflowException as err:
            if resume_run_id is None:
                raise
            raise UserError(
                f"--resume: MLflow run {resume_run_id} is not in {self.uri} ({err.message}); "
                "set tracking.uri (or MLFLOW_TRACKING_URI) to the store the run was logged to"
            ) from None
        self.run_id = run.info.run_id
        if resume_run_id:
            self._reattach()
        else:
            dumped = self.config.model_dump(mode="json")
            params = flatten(dumped)
            for chunk in range(0, len(params), 100):
                items = list(params.items())[chunk : chunk + 100]
                self._mlflow.log_params(dict(items))
            self.client.log_text(
                self.run_id, yaml.safe_dump(dumped, sort_keys=False), "config.yaml"
            )
        tags = {
            "strategy": self.config.strategy.kind,
            "ray.address": self.ray_address,
            "run.seed": str(self.config.run.seed),
        }
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        submission = job_submission_id()
        if submission:
            tags["ray.job_submission_id"] = submission
        self._mlflow.set_tags(tags)
        return self.run_id

    def _reattach(self) -> None:
        """After a driver restart: find the nested runs and the last step already logged."""
        children = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'"
        )
        self.nested = {c.info.run_name: c.info.run_id for c in children}
        run = self.client.get_run(self.run_id)
        steps = [
            m.step
            for key in run.data.metrics
            if key.startswith(("train/", "eval/"))
            for m in self.client.get_metric_history(self.run_id, key)
        ]
        self.logged_step = max(steps, default=-1)

    def _worker_run(self, worker: str) -> str:
        if worker not in self.nested:
            child = self.client.create_run(
                self.experiment_id,
                run_name=worker,
                tags={"mlflow.parentRunId": self.run_id, "worker": worker},
            )
            self.nested[worker] = child.info.run_id
        return self.nested[worker]

    def log(self, step: int, metrics: dict[str, float], force: bool = False) -> bool:
        """Log a step's metrics once; ``force`` adds metrics to a step already logged."""
        from mlflow.entities import Metric

        if step <= self.logged_step and not force:
            return False
        now = int(time.time() * 1000)
        for owner, values in split_by_worker(metrics).items():
            run_id = self.run_id if owner is None else self._worker_run(owner)
            batch = [Metric(k, v, now, step) for k, v in values.items()]
            self.client.log_batch(run_id, metrics=batch)
        self.logged_step = max(self.logged_step, step)
        return True

    def metric_keys(self) -> list[str]:
        return sorted(self.client.get_run(self.run_id).data.metrics)

    def metric_history(self, key: str, worker: str | None = None) -> list[tuple[int, float]]:
        run_id = self.run_id if worker is None else self.nested.get(worker)
        if run_id is None:
            return []
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def log_figure(self, figure: Figure, path: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, figure, path)
        plt.close(figure)  # pyplot keeps every figure alive until closed

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_model(self, model: torch.nn.Module, spec: dict[str, Any]) -> None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            torch.save(model.state_dict(), Path(tmp) / "model.pt")
            (Path(tmp) / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            self.client.log_artifacts(self.run_id, tmp, "model")

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        for child in self.nested.values():
            self.client.set_terminated(child, status)
        self._mlflow.end_run(status=status)
        if self._exported is None:
            os.environ.pop(URI_ENV, None)
        else:
            os.environ[URI_ENV] = self._exported

    def ui_hint(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            base = self.uri.rstrip("/")
        else:
            base = "http://127.0.0.1:5000"
            log.debug("tracking store %s is local; the UI needs `mlflow ui`", self.uri)
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
