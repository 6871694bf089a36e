"""The on-disk MLflow buffer, its sender and its upload, without an MLflow server: the
buffer itself is pure file work; an outage is a ``send`` that raises ConnectionError,
in front of a local SQLite store."""

from __future__ import annotations

import errno
import logging
import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_EXHAUSTED

from orchestrator import tracking_buffer
from orchestrator.config import validate_mapping
from orchestrator.errors import UserError
from orchestrator.tracking import Tracker
from orchestrator.tracking_buffer import Spool, upload
from orchestrator.tracking_records import (
    MAX_BATCH_METRICS,
    batches,
    is_transient,
    metrics_record,
    status_record,
    tags_record,
)
from orchestrator.tracking_sender import retry_delay
from tests.conftest import small_config


def test_records_come_back_in_order_and_the_mark_survives_a_restart(tmp_path):
    spool = Spool(tmp_path / "buf")
    for step in range(1, 6):
        spool.append(metrics_record(None, step, {"train/loss": 1.0 / step}))
    records, offsets = spool.unsent(limit=3)
    assert [r["step"] for r in records] == [1, 2, 3]
    spool.mark_sent(records[:2], offsets[1])
    reopened = Spool(tmp_path / "buf")  # the process died here
    assert [r["step"] for r in reopened.unsent()[0]] == [3, 4, 5]
    assert reopened.pending() == 3 and not reopened.empty


def test_a_caught_up_log_is_emptied_so_only_unsent_records_take_space(tmp_path):
    spool = Spool(tmp_path / "buf")
    spool.append(metrics_record(None, 1, {"a": 1.0}))
    records, offsets = spool.unsent()
    spool.mark_sent(records, offsets[-1])
    assert spool.empty and (tmp_path / "buf" / "records.jsonl").stat().st_size == 0
    spool.append(metrics_record(None, 2, {"a": 2.0}))
    assert [r["step"] for r in Spool(tmp_path / "buf").unsent()[0]] == [2]


def test_a_full_buffer_drops_new_records_but_keeps_final_statuses(tmp_path):
    spool = Spool(tmp_path / "buf", max_bytes=400)
    kept = [spool.append(metrics_record(None, s, {"train/loss": 0.5})) for s in range(1, 9)]
    assert kept[0] and not kept[-1]
    assert spool.append(status_record(None, "FINISHED"))
    steps = [r.get("step") for r in spool.unsent()[0] if r["op"] == "metrics"]
    assert steps == list(range(1, len(steps) + 1))  # the outage's beginning, whole
    assert spool.dropped["metrics"] == kept.count(False) > 0
    assert spool.unsent()[0][-1]["op"] == "status"


def test_staged_artifacts_count_against_the_bound_and_are_freed_when_dropped(tmp_path):
    spool = Spool(tmp_path / "buf", max_bytes=1000)
    folder = spool.stage()
    (folder / "model.pt").write_bytes(b"x" * 2000)
    record = {"op": "artifacts", "run": None, "dir": str(folder.relative_to(spool.path))}
    assert not spool.append({**record, "path": "model"})
    assert not folder.exists() and spool.dropped["artifacts"] == 1


def test_a_full_disk_drops_the_record_whole_and_logging_goes_on(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "buf")
    assert spool.append(metrics_record(None, 1, {"train/loss": 1.0}))
    records_file = tmp_path / "buf" / "records.jsonl"
    real_open = open

    class HalfWritten:
        """Writes half the line, then the disk is full."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return HalfWritten(handle) if str(path) == str(records_file) and "a" in mode else handle

    monkeypatch.setattr("builtins.open", full_disk)
    assert not spool.append(metrics_record(None, 2, {"train/loss": 0.5}))
    monkeypatch.undo()
    assert spool.dropped["metrics"] == 1
    assert spool.append(metrics_record(None, 3, {"train/loss": 0.25}))  # space again
    assert [r["step"] for r in Spool(tmp_path / "buf").unsent()[0]] == [1, 3]


def test_metrics_of_one_run_go_in_batches_and_other_records_alone():
    records = [
        metrics_record(None, 1, {"a": 1.0}),
        metrics_record(None, 2, {"a": 2.0}),
        metrics_record("block-0", 2, {"b": 2.0}),
        tags_record({"t": "1"}),
        metrics_record(None, 3, {f"k{i}": 0.0 for i in range(MAX_BATCH_METRICS)}),
        metrics_record(None, 4, {"a": 4.0}),
    ]
    assert list(batches(records)) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]


def test_only_outages_are_retried():
    assert is_transient(ConnectionRefusedError())
    try:
        try:
            raise ConnectionError("refused")
        except ConnectionError:
            raise MlflowException("API request to http://x failed") from None
    except MlflowException as err:
        assert is_transient(err)  # MLflow's wrapper around requests' failure
    assert is_transient(MlflowException("slow down", RESOURCE_EXHAUSTED))
    assert is_transient(MlflowException("db locked"))  # INTERNAL_ERROR: a 500
    assert not is_transient(MlflowException("bad value", INVALID_PARAMETER_VALUE))
    assert not is_transient(ValueError("bug"))
    import requests

    assert is_transient(requests.exceptions.ReadTimeout("slow"))
    assert not is_transient(requests.exceptions.InvalidURL("http://[x"))  # fails every time


def test_retries_back_off_to_ten_seconds():
    assert [retry_delay(n) for n in (1, 2, 3, 5, 9)] == [0.5, 1.0, 2.0, 8.0, 10.0]


class Outage:
    """``send`` fails like a dead server while ``down`` is set."""

    def __init__(self, monkeypatch):
        self.down = threading.Event()
        real = tracking_buffer.send

        def send(*args, **kwargs):
            if self.down.is_set():
                raise ConnectionRefusedError("[Errno 111] Connection refused")
            return real(*args, **kwargs)

        monkeypatch.setattr(tracking_buffer, "send", send)


def logged(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_an_outage_that_outlasts_the_run_leaves_records_to_upload(tmp_path, monkeypatch, caplog):
    raw = small_config(tmp_path, tmp_path / "data")
    uri = raw["tracking"]["uri"]
    outage = Outage(monkeypatch)
    tracker = Tracker(validate_mapping(raw), "local", buffer=tmp_path / "buf")
    tracker.start()
    for step in (1, 2):
        tracker.log(step, {"train/loss": 1.0 / step, "block-0/train/local_loss": float(step)})
    outage.down.set()
    started = time.monotonic()
    for step in (3, 4, 5):
        tracker.log(step, {"train/loss": 1.0 / step, "block-0/train/local_loss": float(step)})
    tracker.log_text("late", "notes/late.txt")
    assert time.monotonic() - started < 0.5  # training does not wait for the server
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        tracker.finish()
    hint = [r.getMessage() for r in caplog.records if "tracking-upload" in r.getMessage()]
    assert len(hint) == 1 and str(tmp_path / "buf") in hint[0], caplog.text

    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # until uploaded
    outage.down.clear()
    assert upload(tmp_path / "buf", uri) > 0
    assert logged(client, tracker.run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    (child,) = client.search_runs(
        [tracker.experiment_id], f"tags.mlflow.parentRunId = '{tracker.run_id}'"
    )
    assert child.info.status == "FINISHED"
    assert logged(client, child.info.run_id, "train/local_loss") == [1, 2, 3, 4, 5]
    assert "notes/late.txt" in [a.path for a in client.list_artifacts(tracker.run_id, "notes")]
    assert upload(tmp_path / "buf", uri) == 0  # a second upload sends nothing twice

    # The mark is written after the server answers: a crash in between resends a batch,
    # and MLflow keeps one row per (key, step, timestamp, value).
    again = Spool(tmp_path / "again")
    again.write_run(uri, tracker.experiment_id, tracker.run_id)
    again.append(metrics_record(None, 6, {"train/loss": 0.6}))
    log = (again.path / "records.jsonl").read_bytes()
    upload(again.path)
    (again.path / "records.jsonl").write_bytes(log)
    (again.path / "sent").write_text("0")
    assert upload(again.path) == 1
    assert logged(client, tracker.run_id, "train/loss") == [1, 2, 3, 4, 5, 6]

    again.write_run(uri, tracker.experiment_id, "0" * 32)
    with pytest.raises(UserError, match="is not in"):
        upload(again.path)


def test_an_upload_of_a_run_whose_uri_had_credentials_needs_the_full_uri(tmp_path, monkeypatch):
    from orchestrator.errors import UserError
    from orchestrator.tracking_buffer import Spool, upload, upload_hint

    spool = Spool(tmp_path / "buffer")
    spool.write_run("postgresql://user:secret@db/mlflow", "1", "abc")
    assert "secret" not in (tmp_path / "buffer" / "run.json").read_text()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="pass --uri with the full URI"):
        upload(tmp_path / "buffer")
    assert upload_hint(spool.path, "postgresql://***@db/mlflow").endswith("--uri URI")
    assert not upload_hint(spool.path, "http://127.0.0.1:5000").endswith("--uri URI")


def test_removing_a_buffer_takes_its_attempt_folder_only_when_empty(tmp_path):
    from orchestrator.tracking_buffer import Spool

    Spool(tmp_path / "empty-attempt" / "mlflow-buffer").remove()
    assert not (tmp_path / "empty-attempt").exists()
    (tmp_path / "attempt" / "step-000000002").mkdir(parents=True)
    Spool(tmp_path / "attempt" / "mlflow-buffer").remove()
    assert sorted(p.name for p in (tmp_path / "attempt").iterdir()) == ["step-000000002"]
