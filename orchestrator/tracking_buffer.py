"""The run's MLflow records on local disk until the server has them: a write-ahead log.

Every record is appended here first (a JSON line, microseconds on a local disk) and a
background sender moves a high-water mark (the byte offset in ``sent``) past the records
the server accepted. Training never waits for the server; a server that is down only
lets the log grow; records reach MLflow in the order they were made; and a run that
ends (or dies) before the server is back leaves a folder that ``upload`` sends later.

Bounded: past ``max_bytes`` of records and artifacts not yet sent, new records are
dropped (counted, and said once), except the runs' final statuses, which are always kept
so no run is left RUNNING. What the buffer holds is the beginning of the outage, whole.

Layout of a buffer folder::

    records.jsonl   one record a line (``orchestrator.tracking_records``)
    sent            byte offset in records.jsonl of the first record not yet sent
    run.json        the MLflow run the records belong to (uri, experiment id, run id)
    artifacts/N/    the files of artifact record N until they are sent
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import UserError
from orchestrator.tracking_records import Record, RunIds, batches, is_transient, send

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

RECORDS = "records.jsonl"
SENT = "sent"
RUN = "run.json"
ARTIFACTS = "artifacts"
DEFAULT_MAX_BYTES = 1 << 30
ALWAYS_KEPT = frozenset({"status"})


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Spool:
    """One buffer folder; safe to append to from one thread while another sends."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.dropped: Counter[str] = Counter()
        self._lock = threading.Lock()
        path.mkdir(parents=True, exist_ok=True)
        (path / RECORDS).touch()
        self._size = (path / RECORDS).stat().st_size
        # A crash between emptying the log and writing the mark leaves a mark past its end.
        sent = int((path / SENT).read_text()) if (path / SENT).exists() else 0
        self._sent = min(sent, self._size)
        staged = path / ARTIFACTS
        self._unsent_bytes = (
            self._size - self._sent + (_tree_bytes(staged) if staged.exists() else 0)
        )
        self._next_stage = 0

    # -- the writer's side ---------------------------------------------------------------
    def stage(self) -> Path:
        """A new, empty folder for an artifact record's files."""
        with self._lock:
            self._next_stage += 1
            name = f"{time.time_ns()}-{self._next_stage:06d}"
        folder = self.path / ARTIFACTS / name
        folder.mkdir(parents=True)
        return folder

    def append(self, record: Record) -> bool:
        """Log ``record``; False when the buffer is full and it was dropped."""
        line = (json.dumps(record, allow_nan=True) + "\n").encode()
        staged = self.path / record["dir"] if record["op"] == "artifacts" else None
        size = len(line) + (_tree_bytes(staged) if staged else 0)
        with self._lock:
            if self._unsent_bytes + size > self.max_bytes and record["op"] not in ALWAYS_KEPT:
                return self._drop(
                    record,
                    staged,
                    f"is full ({self.max_bytes >> 20} MB not yet sent); records made from "
                    "now on until the server takes the buffer are dropped",
                )
            try:
                with open(self.path / RECORDS, "ab") as out:
                    out.write(line)
            except OSError as err:
                # A full disk: drop the record, never leave half of it for the sender to
                # choke on; training goes on without it.
                with contextlib.suppress(OSError):
                    os.truncate(self.path / RECORDS, self._size)
                return self._drop(
                    record,
                    staged,
                    f"cannot be written ({err.strerror or err}); records are dropped until it can",
                )
            self._size += len(line)
            self._unsent_bytes += size
        return True

    def _drop(self, record: Record, staged: Path | None, why: str) -> bool:
        """Count a record that is not kept, said once per buffer (the end of the run
        reports the count)."""
        self.dropped[record["op"]] += 1
        if sum(self.dropped.values()) == 1:
            log.warning("the MLflow buffer %s %s", self.path, why)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        return False

    # -- the sender's side ---------------------------------------------------------------
    def unsent(self, limit: int = 2000) -> tuple[list[Record], list[int]]:
        """Up to ``limit`` records past the high-water mark, and the offset after each."""
        with self._lock:
            start, end = self._sent, self._size
        records, offsets = [], []
        with open(self.path / RECORDS, "rb") as source:
            source.seek(start)
            position = start
            while position < end and len(records) < limit:
                line = source.readline()
                position += len(line)
                records.append(json.loads(line))
                offsets.append(position)
        return records, offsets

    def mark_sent(self, records: list[Record], offset: int) -> None:
        """The server has ``records`` (which end at ``offset``): move the mark past them,
        free their staged files, and empty the log once everything is sent."""
        for record in records:
            if record["op"] == "artifacts":
                staged = self.path / record["dir"]
                self._release(_tree_bytes(staged))
                shutil.rmtree(staged, ignore_errors=True)
        with self._lock:
            self._unsent_bytes -= offset - self._sent
            self._sent = offset
            if self._sent == self._size:  # caught up: start the log afresh
                (self.path / RECORDS).write_bytes(b"")
                self._sent = self._size = 0
            tmp = self.path / f"{SENT}.tmp"
            tmp.write_text(str(self._sent))
            tmp.replace(self.path / SENT)

    def _release(self, size: int) -> None:
        with self._lock:
            self._unsent_bytes -= size

    def pending(self) -> int:
        """How many records are not yet sent."""
        with self._lock:
            start = self._sent
        with open(self.path / RECORDS, "rb") as source:
            source.seek(start)
            return sum(1 for _ in source)

    @property
    def empty(self) -> bool:
        with self._lock:
            return self._sent == self._size

    def remove(self) -> None:
        """Delete the buffer, and the attempt folder it sits in if nothing else is there:
        a run that failed before its first checkpoint leaves no empty folder."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()

    # -- the run the records belong to ---------------------------------------------------
    def write_run(self, uri: str, experiment_id: str, run_id: str) -> None:
        from orchestrator.tracking_redact import redact_uri

        info = {"uri": redact_uri(uri), "experiment_id": experiment_id, "run_id": run_id}
        (self.path / RUN).write_text(json.dumps(info))

    def read_run(self) -> dict[str, str]:
        try:
            return json.loads((self.path / RUN).read_text())
        except (OSError, ValueError) as err:
            raise UserError(
                f"{self.path} is no MLflow buffer of an unlocked run ({RUN}: {err}); "
                "give the folder the run's closing message named"
            ) from None


def send_unsent(spool: Spool, client: MlflowClient, run_ids: RunIds) -> int:
    """Send what the spool holds, in order, moving the mark after each call; returns how
    many records were sent. A server that is down raises (the mark stays where it was);
    a record the server refuses for good is dropped with a warning."""
    sent = 0
    while True:
        records, offsets = spool.unsent()
        if not records:
            return sent
        for start, end in batches(records):
            chunk = records[start:end]
            try:
                send(client, chunk, run_ids, spool.path)
            except Exception as err:
                if is_transient(err):
                    raise
                log.warning(
                    "MLflow refused %d %s record(s), dropped: %s", len(chunk), chunk[0]["op"], err
                )
            spool.mark_sent(chunk, offsets[end - 1])
            sent += len(chunk)


def _check_run_exists(client: MlflowClient, run_id: str, uri: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as err:
        if is_transient(err):
            raise UserError(f"--uri: MLflow at {uri} cannot be reached ({err})") from None
        raise UserError(
            f"--uri: MLflow run {run_id} is not in {uri} ({err.message}); upload to the "
            "tracking store the run was logged to"
        ) from None


def upload_hint(path: Path, uri: str = "") -> str:
    """The upload command; it names ``--uri`` where the buffer cannot keep the address
    (a URI with credentials is stored redacted)."""
    from orchestrator.tracking_redact import REDACTED

    needs_uri = f"{REDACTED}@" in uri
    return f"unlocked tracking-upload {path}" + (" --uri URI" if needs_uri else "")


def _target(run_uri: str, uri: str | None) -> str:
    """Where an upload goes: ``--uri``, else the run's store, whose credentials the buffer
    does not keep, so a redacted one falls back to ``$MLFLOW_TRACKING_URI``."""
    from orchestrator.tracking_redact import REDACTED

    if uri:
        return uri
    if f"{REDACTED}@" not in run_uri:
        return run_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise UserError(
        f"the run logged to {run_uri}, whose credentials the buffer does not keep; pass "
        "--uri with the full URI, or set MLFLOW_TRACKING_URI"
    )


def upload(path: str | Path, uri: str | None = None) -> int:
    """Send a buffer folder a run left behind to MLflow (``uri``; default: the one the
    run logged to); returns the number of records sent. Safe to repeat or interrupt:
    only records past the high-water mark are sent, and resending one is harmless."""
    from mlflow import MlflowClient

    from orchestrator.tracking import quiet_mlflow_client
    from orchestrator.tracking_probe import check_reachable

    if not (Path(path) / RUN).is_file():
        raise UserError(
            f"{path} is no MLflow buffer of an unlocked run (it has no {RUN}); give the "
            "folder the run's closing message named"
        )
    spool = Spool(Path(path))
    run = spool.read_run()
    target = _target(run["uri"], uri)
    check_reachable(target, field="--uri")
    client = MlflowClient(target)
    with quiet_mlflow_client():
        _check_run_exists(client, run["run_id"], target)
        try:
            return send_unsent(spool, client, RunIds(client, run["experiment_id"], run["run_id"]))
        except Exception as err:
            if not is_transient(err):
                raise
            raise UserError(
                f"MLflow at {target} stopped answering during the upload ({err}); what was "
                f"sent is marked in {spool.path}, run `{upload_hint(spool.path)}` again"
            ) from None
