"""What a run tells MLflow, as plain JSON records, and how a list of them is sent.

Every call the tracker makes is a record first (``metrics``, ``params``, ``tags``,
``artifacts``, ``status``), so the live sender and a later upload of the on-disk buffer
send them the same way, in the order they were made. A record names its run by owner
(None: the parent run, ``block-1``: that worker's nested run), so records made while the
server was down need no run id that only the server can hand out.

Sending a record twice is harmless, which is what makes "at least once" from the buffer
"exactly once" in MLflow: a metric carries the timestamp of its step, and MLflow's SQL
store keeps one row per (key, step, timestamp, value); params, tags, artifacts and
statuses are overwritten with the same values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

Record = dict[str, Any]
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
MAX_BATCH_PARAMS = 100


def now_ms() -> int:
    return int(time.time() * 1000)


def metrics_record(owner: str | None, step: int, values: dict[str, float]) -> Record:
    return {"op": "metrics", "run": owner, "step": step, "ts": now_ms(), "values": values}


def params_records(values: dict[str, str]) -> list[Record]:
    items = list(values.items())
    return [
        {"op": "params", "run": None, "values": dict(items[i : i + MAX_BATCH_PARAMS])}
        for i in range(0, len(items), MAX_BATCH_PARAMS)
    ]


def tags_record(values: dict[str, str], owner: str | None = None) -> Record:
    return {"op": "tags", "run": owner, "values": values}


def artifacts_record(directory: str, artifact_path: str | None) -> Record:
    """``directory``: relative to the buffer, its files go under ``artifact_path``."""
    return {"op": "artifacts", "run": None, "dir": directory, "path": artifact_path}


def status_record(owner: str | None, status: str) -> Record:
    return {"op": "status", "run": owner, "status": status, "ts": now_ms()}


def is_transient(err: BaseException) -> bool:
    """Worth retrying later: the server is down, overloaded or failing (connection
    errors, timeouts, 429, 5xx). Anything else (a 4xx, a bad value) fails again the
    same way and is dropped with a warning instead of blocking every record behind it."""
    from mlflow.exceptions import MlflowException

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConnectionError | TimeoutError):
            return True
        if type(seen).__module__.startswith(("requests", "urllib3")):
            return not _is_bad_address(seen)
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    return False


def _is_bad_address(err: BaseException) -> bool:
    """A malformed URL fails the same way on every retry."""
    import requests

    bad = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)
    return isinstance(err, bad + (requests.exceptions.InvalidSchema,))


class RunIds:
    """Owner -> MLflow run id. A worker's nested run is looked up under the parent
    before it is created, so a resent record or a resumed run never makes a second one."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_id: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_id = parent_id
        self.nested: dict[str, str] = {}

    def __call__(self, owner: str | None) -> str:
        if owner is None:
            return self.parent_id
        if owner not in self.nested:
            self.nested[owner] = self._find(owner) or self._create(owner)
        return self.nested[owner]

    def _find(self, owner: str) -> str | None:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' "
            f"and tags.worker = '{owner}'",
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def _create(self, owner: str) -> str:
        child = self.client.create_run(
            self.experiment_id,
            run_name=owner,
            tags={"mlflow.parentRunId": self.parent_id, "worker": owner},
        )
        return child.info.run_id


def batches(records: Sequence[Record]) -> Iterator[tuple[int, int]]:
    """[start, end) ranges sent as one call: consecutive metric records of one run, up
    to MLflow's batch limit; every other record alone."""
    start = 0
    while start < len(records):
        end = start + 1
        if records[start]["op"] == "metrics":
            count = len(records[start]["values"])
            while (
                end < len(records)
                and records[end]["op"] == "metrics"
                and records[end]["run"] == records[start]["run"]
                and count + len(records[end]["values"]) <= MAX_BATCH_METRICS
            ):
                count += len(records[end]["values"])
                end += 1
        yield start, end
        start = end


def send(
    client: MlflowClient,
    records: Sequence[Record],
    run_id: Callable[[str | None], str],
    root: Path,
) -> None:
    """One MLflow call for ``records`` (one of ``batches``); ``root``: the buffer folder
    that artifact records' folders are relative to."""
    from mlflow.entities import Metric, Param, RunTag

    first = records[0]
    target = run_id(first["run"])
    op = first["op"]
    if op == "metrics":
        metrics = [
            Metric(key, value, record["ts"], record["step"])
            for record in records
            for key, value in record["values"].items()
        ]
        client.log_batch(target, metrics=metrics)
    elif op == "params":
        client.log_batch(target, params=[Param(k, v) for k, v in first["values"].items()])
    elif op == "tags":
        client.log_batch(target, tags=[RunTag(k, v) for k, v in first["values"].items()])
    elif op == "artifacts":
        client.log_artifacts(target, str(root / first["dir"]), first["path"])
    elif op == "status":
        client.set_terminated(target, first["status"], first["ts"])
    else:
        raise ValueError(f"unknown tracking record {op!r} in {root}")
