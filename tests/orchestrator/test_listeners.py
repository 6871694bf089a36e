"""Nothing of an embedded Ray is reachable from another machine: every listener on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.listeners import is_loopback, listeners, process_tree, public_listeners

REPO = Path(__file__).resolve().parents[2]

# A fresh process, as `unlocked run` is one: it imports Ray first (as a strategy module or
# a user's script would, before the orchestrator decides anything), starts the local Ray
# through `connect`, runs one actor so that workers start too, and prints every listening
# socket of itself and the processes below it.
EMBEDDED_RUN = """
import json, os, ray
from orchestrator.cluster import connect
from orchestrator.config import ResourcesConfig
from orchestrator.listeners import listeners, process_tree

connect(ResourcesConfig(), cpus_needed=1)

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

ray.get(Probe.remote().pid.remote())
found = listeners(process_tree(os.getpid()))
print(json.dumps({
    "driver_pid": os.getpid(),
    "listeners": [[item.pid, item.process, item.ip, item.port] for item in found],
}))
ray.shutdown()
"""


@pytest.mark.parametrize(
    ("ip", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.2", False),
        ("::ffff:192.0.2.2", False),
    ],
)
def test_loopback_is_127_and_colon_colon_1_never_a_wildcard(ip: str, loopback: bool) -> None:
    assert is_loopback(ip) is loopback


def test_public_listeners_names_a_socket_on_every_interface_not_one_on_loopback() -> None:
    with socket.socket() as public, socket.socket() as local:
        public.bind(("0.0.0.0", 0))
        public.listen()
        local.bind(("127.0.0.1", 0))
        local.listen()
        me = process_tree(os.getpid())
        ports = {item.port for item in public_listeners(me)}
        every = {item.port for item in listeners(me)}
        assert public.getsockname()[1] in ports
        assert local.getsockname()[1] not in ports
        assert local.getsockname()[1] in every


def test_a_gone_process_has_no_listeners() -> None:
    assert process_tree(2**22 + 1) == set()
    assert listeners([2**22 + 1]) == []


@pytest.mark.slow
def test_every_listener_of_an_embedded_ray_is_on_loopback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDED_RUN],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    found = report["listeners"]
    processes = {process for _, process, _, _ in found}
    # The servers the issue found on every interface are all here, so an empty or partial
    # reading cannot pass: GCS, raylet, the driver's gRPC server, the two agents.
    assert {"gcs_server", "raylet"} <= processes, found
    assert report["driver_pid"] in {pid for pid, _, _, _ in found}, found
    assert any("DashboardAgent" in p for p in processes), found
    assert any("RuntimeEnvAgent" in p for p in processes), found
    public = [entry for entry in found if not is_loopback(entry[2])]
    assert public == [], f"listening beyond loopback: {public}"
