"""Joining an existing Ray cluster: a real `ray start --head` on free loopback ports."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, small_config, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head in the foreground (`--block`), so stopping it never touches other Rays.

    Loopback only (Ray's single-machine mode), and with token authentication on: the
    head and every client of it get the same token through the environment. One head
    serves the module: each run leaves it idle again, and a start costs ~10 s of two cores.
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        # Stopped by SIGTERM to its whole process group: nothing left to drain for 30 s.
        env.setenv("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent))
        port = free_port()
        # Ray's socket paths must stay short: not under pytest's long tmp_path.
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        head = subprocess.Popen(
            [
                ray_bin,
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=3",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}",
                f"--temp-dir={temp_dir}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert head.poll() is None, head.stdout.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "ray head did not start"
                time.sleep(0.5)
        yield address
        os.killpg(head.pid, 15)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_cli(tmp_path: Path, raw: dict, timeout: int) -> subprocess.CompletedProcess:
    """`python -m orchestrator run` on ``raw``, as a user would, from a fresh process."""
    path = write_config(tmp_path, raw)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_joins_a_running_cluster_by_address(ray_head, tmp_path, dataset_root):
    raw = small_config(tmp_path, dataset_root, resources={"address": ray_head})
    done = run_cli(tmp_path, raw, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stopped at step 8" in done.stdout
    assert "eval/accuracy=" in done.stdout


def test_a_run_that_does_not_fit_the_cluster_says_so(ray_head, tmp_path, dataset_root):
    raw = small_config(
        tmp_path,
        dataset_root,
        resources={"address": ray_head, "cpus_per_worker": 2, "placement_timeout_s": 5},
    )
    done = run_cli(tmp_path, raw, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs 3 workers of {'CPU': 2.0}" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_sigterm_handler_outlives_what_ray_init_installs():
    import signal

    from orchestrator.cluster import _sigterm_kept

    def ours(_signum, _frame):
        return None

    before = signal.signal(signal.SIGTERM, ours)
    try:
        with _sigterm_kept():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init does, in effect
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)
