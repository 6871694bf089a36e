"""MLflow tracking: one parent run per job, a nested run per worker.

Metric keys name their owner (the scheme is ``strategies.base``'s):
``block-1/train/local_loss`` goes to the nested run ``block-1`` as ``train/local_loss``;
keys without a worker prefix (``train/loss``, ``eval/accuracy``) go to the parent. Steps
at or below the highest step already logged are skipped, so a run that replays steps
after restoring a checkpoint never logs a step twice.

Only ``start`` waits for the server (it needs the run's id). Everything after it is a
record appended to the run's on-disk buffer and sent by a background thread
(``orchestrator.tracking_buffer``, ``orchestrator.tracking_sender``): a server that dies
mid-run costs training nothing, gets every record in order when it is back, and a run
that ends first says where its records wait and how to upload them.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.errors import UserError
from orchestrator.locations import job_submission_id
from orchestrator.thinned import ThinnedSteps
from orchestrator.tracking_buffer import DEFAULT_MAX_BYTES, Spool, send_unsent, upload_hint
from orchestrator.tracking_records import (
    Record,
    RunIds,
    artifacts_record,
    is_transient,
    metrics_record,
    params_records,
    status_record,
    tags_record,
)
from orchestrator.tracking_redact import redact, redact_uri
from orchestrator.tracking_sender import TrackingSender

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from orchestrator.config import RunConfig

log = logging.getLogger(__name__)

WORKER_KEY = re.compile(r"^(?P<worker>[a-z]+-\d+)/(?P<metric>.+)$")
DEFAULT_DB = "mlruns.db"
URI_ENV = "MLFLOW_TRACKING_URI"
BUFFER_FOLDER = "mlflow-buffer"
BUFFER_ROOT_ENV = "UNLOCKED_TRACKING_BUFFER"
"""Where the buffers of runs whose checkpoints are remote go (default
``.unlocked/mlflow-buffer``); the Helm chart points it at ``/tmp``, its only writable
place besides mounted volumes."""
# MLflow's defaults retry a dead server 7 times with exponential backoff and wait 120 s
# for an answer: minutes per call. The sender retries on its own schedule, so one retry
# after 1 s is enough. MLflow also prints a "View run" line to stdout as each run ends,
# from the sender's thread into the run's progress; the closing lines name the run.
# A user's own settings of these variables win.
QUIET_CLIENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
CLOSE_TIMEOUT_S = 60.0
CURVE_POINTS = 4_000
"""Points kept of each parent curve for the published plots."""
PLOTTED = ("train/", "eval/")
"""The parent's metrics whose curves are kept for the plots."""


def default_tracking_uri(configured: str | None) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, then a SQLite file in the working directory."""
    if configured:
        return configured
    if os.environ.get(URI_ENV):
        return os.environ[URI_ENV]
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


@contextmanager
def quiet_mlflow_client() -> Iterator[None]:
    """MLflow reads these at every request; set them (unless the user did) for as long
    as a run or an upload talks to the server, then put back what was there."""
    added = [name for name in QUIET_CLIENT if name not in os.environ]
    os.environ.update({name: QUIET_CLIENT[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def buffer_folder(run_location: str) -> Path:
    """Where a run's MLflow buffer lives: in its checkpoint folder when that is on this
    machine, else under ``$UNLOCKED_TRACKING_BUFFER`` or ``.unlocked/mlflow-buffer`` (an
    append-only log needs a local disk)."""
    if "://" not in run_location or run_location.startswith("file://"):
        return Path(run_location.removeprefix("file://")).absolute() / BUFFER_FOLDER
    root = Path(os.environ.get(BUFFER_ROOT_ENV) or Path(".unlocked") / BUFFER_FOLDER)
    return root.absolute() / run_location.split("://", 1)[1]


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

    def __init__(
        self,
        config: RunConfig,
        ray_address: str,
        buffer: Path | None = None,
        max_buffer_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        from mlflow import MlflowClient

        self.config = config
        self.uri = default_tracking_uri(config.tracking.uri)
        self._restore = ExitStack()
        self._restore.enter_context(quiet_mlflow_client())
        self.client = MlflowClient(self.uri)
        self.ray_address = ray_address
        location = f"{config.checkpoint.root.rstrip('/')}/{config.run_name}"
        folder = buffer or buffer_folder(location)
        try:
            self.spool = Spool(folder, max_buffer_bytes)
        except OSError as err:
            raise UserError(
                f"tracking: the MLflow buffer folder {folder} cannot be written "
                f"({err.strerror}); point ${BUFFER_ROOT_ENV} at a writable folder, or set "
                "tracking.enabled: false"
            ) from None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.workers: set[str] = set()
        self.logged_step = -1
        # The parent's curves, for the plots published at the end without asking a
        # server that may be down (and may not yet have the last steps); thinned, as a
        # plot needs no more points than it has pixels.
        self.history: dict[str, ThinnedSteps[float]] = {}
        self._sender: TrackingSender | None = None
        self._monitor: Any = None
        self._finished = False

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
        """Create (or reopen) the run, the one step that waits for the server."""
        try:
            self._send_leftovers()
            self.experiment_id = self._experiment()
            self.run_id = self._reopen(resume_run_id) if resume_run_id else self._create()
            run_ids = RunIds(self.client, self.experiment_id, self.run_id)
            self.spool.write_run(self.uri, self.experiment_id, self.run_id)
            # From here on ``finish`` has a sender to hand the runs' final status to.
            self._sender = TrackingSender(self.spool, self.client, run_ids, redact_uri(self.uri))
            self._sender.start()
            if resume_run_id:
                self._reattach(run_ids)
        except Exception as err:
            if not is_transient(err):
                raise
            raise UserError(
                f"tracking.uri: MLflow at {redact_uri(self.uri)} stopped answering as the "
                f"run started ({str(err).splitlines()[0][:300]}); start it again, or set "
                "tracking.enabled: false"
            ) from None
        if not resume_run_id:
            dumped = redact(self.config.model_dump(mode="json"))
            for record in params_records(flatten(dumped)):
                self._append(record)
            self.log_text(yaml.safe_dump(dumped, sort_keys=False), "config.yaml")
        self._append(tags_record(self._tags()))
        self._start_system_metrics(resumed=resume_run_id is not None)
        return self.run_id

    def _send_leftovers(self) -> None:
        """Records a resumed run's previous attempt could not send go first, before the
        run is RUNNING again (they end with that attempt's final status)."""
        if self.spool.empty:
            return
        left = self.spool.read_run()
        sent = send_unsent(
            self.spool, self.client, RunIds(self.client, left["experiment_id"], left["run_id"])
        )
        log.info("sent %d MLflow records an earlier attempt left in %s", sent, self.spool.path)

    def _create(self) -> str:
        from mlflow.tracking.context.registry import resolve_tags

        run = self.client.create_run(
            self.experiment_id, run_name=self.config.run_name, tags=resolve_tags({})
        )
        return run.info.run_id

    def _reopen(self, run_id: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as err:
            if is_transient(err):
                raise
            raise UserError(
                f"--resume: MLflow run {run_id} is not in {redact_uri(self.uri)} "
                f"({err.message}); set tracking.uri (or MLFLOW_TRACKING_URI) to the store "
                "the run was logged to"
            ) from None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _tags(self) -> dict[str, str]:
        tags = {
            "strategy": self.config.strategy.kind,
            "ray.address": redact_uri(self.ray_address),
            "run.seed": str(self.config.run.seed),
        }
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        submission = job_submission_id()
        if submission:
            tags["ray.job_submission_id"] = submission
        return tags

    def _start_system_metrics(self, resumed: bool) -> None:
        if not self.config.tracking.system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=resumed, tracking_uri=self.uri
            )
        except Exception as err:  # psutil missing or unsupported: the run goes on without
            log.warning("system metrics are not logged: %s", err)
            return
        self._monitor.start()

    def _reattach(self, run_ids: RunIds) -> None:
        """After a driver restart: find the nested runs and the steps already logged."""
        children = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'"
        )
        run_ids.nested = {c.info.run_name: c.info.run_id for c in children}
        self.workers = set(run_ids.nested)
        run = self.client.get_run(self.run_id)
        for key in run.data.metrics:
            if key.startswith(PLOTTED):
                for m in self.client.get_metric_history(self.run_id, key):
                    self._curve(key).put(m.step, m.value)
        latest = [curve.latest for curve in self.history.values() if curve.latest is not None]
        self.logged_step = max(latest, default=-1)

    def _append(self, record: Record) -> None:
        self.spool.append(record)
        if self._sender is not None:
            self._sender.notify()

    def log(self, step: int, metrics: dict[str, float], force: bool = False) -> bool:
        """Log a step's metrics once; ``force`` adds metrics to a step already logged."""
        if step <= self.logged_step and not force:
            return False
        for owner, values in split_by_worker(metrics).items():
            if owner is None:
                for key, value in values.items():
                    if key.startswith(PLOTTED):
                        self._curve(key).put(step, value)
            else:
                self.workers.add(owner)
            self._append(metrics_record(owner, step, values))
        self.logged_step = max(self.logged_step, step)
        return True

    def metric_keys(self) -> list[str]:
        """The parent's plotted metric keys (``PLOTTED``), as far as this run knows them."""
        return sorted(self.history)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """The parent's ``(step, value)`` of ``key``, across resumes."""
        curve = self.history.get(key)
        return curve.items() if curve is not None else []

    def _curve(self, key: str) -> ThinnedSteps[float]:
        if key not in self.history:
            self.history[key] = ThinnedSteps(CURVE_POINTS)
        return self.history[key]

    def _log_files(self, path: str, write: Callable[[Path], object]) -> None:
        """Stage the artifact ``path`` in the buffer (``write(file)`` makes it) and send it
        later: the caller's objects may change once this returns."""
        folder = self.spool.stage()
        target = folder / Path(path).name
        write(target)
        parent = str(Path(path).parent)
        self._append(
            artifacts_record(
                str(folder.relative_to(self.spool.path)), parent if parent != "." else None
            )
        )

    def log_figure(self, figure: Figure, path: str) -> None:
        import matplotlib.pyplot as plt

        self._log_files(path, figure.savefig)
        plt.close(figure)  # pyplot keeps every figure alive until closed

    def log_text(self, text: str, path: str) -> None:
        self._log_files(path, lambda target: target.write_text(text))

    def log_model(self, model: torch.nn.Module, spec: dict[str, Any]) -> None:
        import torch

        def write(folder: Path) -> None:
            folder.mkdir()
            torch.save(model.state_dict(), folder / "model.pt")
            (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

        self._log_files("model", write)

    def set_tag(self, key: str, value: str) -> None:
        self._append(tags_record({key: value}))

    def finish(self, status: str = "FINISHED") -> None:
        """End every run with ``status`` and wait (a while) for the server to take what
        is left; what it does not take stays in the buffer, and one message says how to
        upload it. Only the first call counts (a callback failing after the end)."""
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            self._monitor.finish()
        if self.run_id is not None:
            for worker in sorted(self.workers):
                self._append(status_record(worker, status))
            self._append(status_record(None, status))
        if self._sender is None or self._sender.close(CLOSE_TIMEOUT_S):
            if self.spool.empty:
                self.spool.remove()  # all sent (or nothing started): nothing to keep
        else:
            log.warning(
                "MLflow at %s did not take %d records of this run (metrics, artifacts, the "
                "runs' final status); they are kept in %s. Once the server is back, send "
                "them with: %s",
                redact_uri(self.uri),
                self.spool.pending(),
                self.spool.path,
                upload_hint(self.spool.path, redact_uri(self.uri)),
            )
        if self.spool.dropped:
            log.warning(
                "the MLflow buffer was full: %s records were dropped",
                ", ".join(f"{n} {op}" for op, n in sorted(self.spool.dropped.items())),
            )
        self._restore.close()

    def ui_hint(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            base = self.uri.rstrip("/")
        else:
            base = "http://127.0.0.1:5000"
            log.debug("tracking store %s is local; the UI needs `mlflow ui`", self.uri)
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
