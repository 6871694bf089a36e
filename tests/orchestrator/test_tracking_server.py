"""MLflow stopped and restarted mid-run: a real `mlflow server` on loopback, killed while
the run logs and started again on the same port and database."""

from __future__ import annotations

import time

from mlflow import MlflowClient

from benchmarks.chaos_storage import MlflowServer
from orchestrator.config import validate_mapping
from orchestrator.tracking import Tracker
from tests.conftest import small_config

WORKERS = ("block-0", "block-1")


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def log_steps(tracker: Tracker, steps: range) -> float:
    started = time.monotonic()
    for step in steps:
        metrics = {"train/loss": 1.0 / step} | {f"{w}/train/local_loss": step for w in WORKERS}
        tracker.log(step, metrics)
    return time.monotonic() - started


def test_a_run_survives_its_tracking_server_restarting(tmp_path):
    server = MlflowServer(tmp_path)
    raw = small_config(tmp_path, tmp_path / "data")
    raw["tracking"]["uri"] = server.uri
    try:
        server.start()
        tracker = Tracker(validate_mapping(raw), "local", buffer=tmp_path / "buffer")
        tracker.start()
        log_steps(tracker, range(1, 5))
        wait_for(lambda: tracker.spool.empty)
        server.kill()
        assert log_steps(tracker, range(5, 9)) < 5.0  # training does not wait for retries
        tracker.set_tag("failures", "0")
        wait_for(lambda: tracker._sender.failures > 0)
        server.start()
        log_steps(tracker, range(9, 13))
        tracker.finish()

        assert not (tmp_path / "buffer").exists()  # everything sent, nothing left behind
        client = MlflowClient(server.uri)
        every_step = list(range(1, 13))
        assert logged(client, tracker.run_id, "train/loss") == every_step
        parent = client.get_run(tracker.run_id)
        assert parent.info.status == "FINISHED" and parent.data.tags["failures"] == "0"
        children = client.search_runs(
            [tracker.experiment_id], f"tags.mlflow.parentRunId = '{tracker.run_id}'"
        )
        assert sorted(c.info.run_name for c in children) == list(WORKERS)
        for child in children:
            assert child.info.status == "FINISHED"
            assert logged(client, child.info.run_id, "train/local_loss") == every_step
        assert "config.yaml" in [a.path for a in client.list_artifacts(tracker.run_id)]
    finally:
        server.close()


def logged(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """Every step logged under ``key``, with repeats: a duplicate would show."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))
