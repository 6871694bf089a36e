"""MLflow stopped and restarted mid-run: a real `mlflow server` on loopback, killed while
the run logs and started again on the same port and database."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from orchestrator.config import validate_mapping
from orchestrator.tracking import Tracker
from tests.conftest import free_port, small_config

WORKERS = ("block-0", "block-1")
# `mlflow server` is this app under uvicorn, configured by these variables. Starting the
# CLI costs 10-20 s on two cores (two interpreters import the app); this launcher imports
# it once and forks a fresh server process per start, so a restart takes well under a
# second and the test stays small.
LAUNCHER = """
import os, signal, sys
from mlflow.server import ARTIFACT_ROOT_ENV_VAR, ARTIFACTS_DESTINATION_ENV_VAR
from mlflow.server import BACKEND_STORE_URI_ENV_VAR, SERVE_ARTIFACTS_ENV_VAR
from mlflow.utils.server_cli_utils import resolve_default_artifact_root
port, root = int(sys.argv[1]), sys.argv[2]
store = f"sqlite:///{root}/mlflow.db"
os.environ[BACKEND_STORE_URI_ENV_VAR] = store
os.environ[ARTIFACT_ROOT_ENV_VAR] = resolve_default_artifact_root(True, None, store)
os.environ[ARTIFACTS_DESTINATION_ENV_VAR] = f"{root}/artifacts"
os.environ[SERVE_ARTIFACTS_ENV_VAR] = "true"
import uvicorn
from mlflow.server.fastapi_app import app
server = 0
for command in sys.stdin:
    if command.strip() == "start" and not server:
        server = os.fork()
        if server == 0:
            uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
            os._exit(0)
    elif command.strip() == "kill" and server:
        os.kill(server, signal.SIGKILL)
        os.waitpid(server, 0)
        server = 0
if server:  # the test is over (or died): no server outlives it
    os.kill(server, signal.SIGKILL)
"""


class Server:
    """A real MLflow tracking server on loopback: one database, one port, restartable."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(self.port), str(root)],
            stdin=subprocess.PIPE,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            text=True,
        )

    def _command(self, command: str) -> None:
        self.launcher.stdin.write(command + "\n")
        self.launcher.stdin.flush()

    def start(self) -> None:
        self._command("start")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        pytest.fail(f"the MLflow server did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: whatever it was doing is cut off, as in a crash."""
        self._command("kill")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.uri}/health", timeout=0.2)
            except requests.ConnectionError:
                return
            time.sleep(0.05)
        pytest.fail("the MLflow server did not stop")

    def close(self) -> None:
        self.launcher.stdin.close()
        self.launcher.wait(timeout=30)


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
    server = Server(tmp_path)
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
