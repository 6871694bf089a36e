"""The README's cluster path, for real: `deploy/local-cluster.sh` starts a Ray head and an
MLflow server (both with authentication on) on free loopback ports, the README's
`ray job submit` line runs an example, and MLflow's REST API and UI show the run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
README_BLOCK = "<!-- local-cluster steps: run by tests/deploy/test_local_cluster.py -->"


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]  # the shell after `source env.sh`, with .venv/bin on PATH
    mlflow: str

    @property
    def auth(self) -> tuple[str, str]:
        return self.env["MLFLOW_TRACKING_USERNAME"], self.env["MLFLOW_TRACKING_PASSWORD"]

    def api(self, endpoint: str, **params: str) -> dict:
        """GET one endpoint of MLflow's REST API, as its basic-auth admin."""
        url = f"{self.mlflow}/api/2.0/mlflow/{endpoint}"
        reply = requests.get(url, params, auth=self.auth, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def search(self, experiment_id: str, filter_string: str) -> list[dict]:
        reply = requests.post(
            f"{self.mlflow}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [experiment_id], "filter": filter_string},
            auth=self.auth,
            timeout=30,
        )
        reply.raise_for_status()
        return reply.json().get("runs", [])

    def submit(self, example: str, options: str) -> subprocess.CompletedProcess:
        """`unlocked submit examples/EXAMPLE.yaml OPTIONS`, which must succeed."""
        done = self.run(f"unlocked submit examples/{example}.yaml {options}")
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def run(self, command: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def exported(env_file: Path) -> dict[str, str]:
    """The variables an `export A=1 B=2` file sets, as `source` would."""
    values = {}
    for line in env_file.read_text().splitlines():
        if line.startswith("export "):
            for word in shlex.split(line.removeprefix("export ")):
                key, _, value = word.partition("=")
                values[key] = value
    return values


def readme_commands() -> list[str]:
    """The commands of the README's local-cluster block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = text.split(README_BLOCK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def _can_isolate_network() -> bool:
    return shutil.which("unshare") is not None and (
        subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _can_isolate_network(), reason="needs `unshare -n` (root)")
def test_worker_nodes_join_and_a_job_spans_them(tmp_path):
    """WORKERS=1: two nodes of 2 CPUs, so a 3-block pipeline must place blocks on both.

    Ray's multi-node mode binds on every interface, so this runs in a network namespace of
    its own, where the only interface is a private loopback.
    """
    script = f"""
        set -e
        ip link set lo up
        export STATE_DIR={tmp_path}/cluster WORKERS=1 CPUS=2
        trap 'bash deploy/local-cluster.sh down' EXIT
        bash deploy/local-cluster.sh up
        source {tmp_path}/cluster/env.sh
        export PATH={Path(sys.executable).parent}:$PATH
        ray status --address 127.0.0.1:6379
        unlocked submit examples/pipeline.yaml --set stop.max_steps=2 --set data.size=5000
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    done = subprocess.run(
        ["unshare", "-n", "bash", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "head + 1 worker node(s)" in done.stdout
    assert re.search(r"^\s*1 node_\w+\n\s*1 node_\w+", done.stdout, re.M), done.stdout
    assert "0.0/4.0 CPU" in done.stdout
    assert "SUCCEEDED" in done.stdout and "stopped at step 2 (max_steps)" in done.stdout


def test_a_failed_up_stops_what_it_started_and_leaves_no_half_made_store(tmp_path):
    """MLflow starts first; a head that cannot start (here: a CPU count Ray refuses once
    its GCS and dashboard are up) must take MLflow down with it and remove the stores this
    `up` began, so the next `up` is clean."""
    state = tmp_path / "cluster"
    mlflow_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(
        STATE_DIR=str(state),
        GCS_PORT=str(free_port()),
        DASHBOARD_PORT=str(free_port()),
        MLFLOW_PORT=str(mlflow_port),
        CPUS="-1",
    )
    up = subprocess.run(
        ["bash", "deploy/local-cluster.sh", "up"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert up.returncode != 0
    assert "up failed; stopping what it started" in up.stderr, up.stderr
    assert not list(state.glob("*.pid"))
    assert not (state / "mlflow.db").exists() and not (state / "mlflow-auth.db").exists()
    assert (state / "mlflow.log").exists()  # the logs stay, to say what went wrong
    listening = [
        c for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == mlflow_port
    ]  # fmt: skip
    assert not listening, "MLflow was left running"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    ports = {"GCS_PORT": free_port(), "DASHBOARD_PORT": free_port(), "MLFLOW_PORT": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update({k: str(v) for k, v in ports.items()}, STATE_DIR=str(state), CPUS="3")
    script = ["bash", "deploy/local-cluster.sh"]
    up = subprocess.run(
        [*script, "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        shell = {**env, **exported(state / "env.sh")}
        shell["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        yield Cluster(state, shell, f"http://127.0.0.1:{ports['MLFLOW_PORT']}")
    finally:
        down = subprocess.run([*script, "down"], cwd=REPO, env=env, capture_output=True, text=True)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def cartpole(cluster: Cluster) -> subprocess.CompletedProcess:
    """One short job that the UI, status and lost-output tests all read back (each job
    costs ~40 s of two cores), submitted as the README says, with an empty checkpoint root
    so that its outputs would vanish with its temporary working directory."""
    return cluster.submit(
        "eggroll-cartpole",
        "--set stop.max_steps=2 --set run.name=cartpole-ui --submission-id cartpole-followed "
        "--env UNLOCKED_CHECKPOINT_ROOT=",
    )


def parent_run(cluster: Cluster, submission_id: str) -> dict:
    experiment = cluster.api("experiments/get-by-name", experiment_name="unlocked")
    found = cluster.search(
        experiment["experiment"]["experiment_id"],
        f"tags.`ray.job_submission_id` = '{submission_id}'",
    )
    runs = [r for r in found if "mlflow.parentRunId" not in _tags(r)]
    assert len(runs) == 1, found
    return runs[0]


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def submission_id_in(output: str) -> str:
    match = re.search(r"(raysubmit_\w+)", output)
    assert match, output
    return match[1]


def test_readme_ray_job_submit_line_runs_and_mlflow_has_it(cluster):
    submit = [c for c in readme_commands() if c.startswith("ray job submit")]
    assert len(submit) == 1, readme_commands()
    done = cluster.run(submit[0])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout + done.stderr
    run = parent_run(cluster, submission_id_in(done.stdout + done.stderr))
    info, tags = run["info"], _tags(run)
    assert info["run_name"] == "pipeline-teacher" and info["status"] == "FINISHED"
    assert tags["strategy"] == "pipeline"

    run_id = info["run_id"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["eval/accuracy"] > 0.3
    history = cluster.api("metrics/get-history", run_id=run_id, metric_key="train/loss")
    assert [m["step"] for m in history["metrics"]] == list(range(1, 41))

    children = cluster.search(info["experiment_id"], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c["info"]["run_name"] for c in children) == ["block-0", "block-1", "block-2"]
    assert all(any(m["key"] == "train/local_loss" for m in c["data"]["metrics"]) for c in children)

    artifacts = {f["path"] for f in cluster.api("artifacts/list", run_id=run_id)["files"]}
    assert {"config.yaml", "model", "plots"} <= artifacts
    model = {f["path"] for f in cluster.api("artifacts/list", run_id=run_id, path="model")["files"]}
    assert model == {"model/model.pt", "model/model.yaml"}
    config = requests.get(
        f"{cluster.mlflow}/get-artifact",
        {"path": "config.yaml", "run_uuid": run_id},
        auth=cluster.auth,
        timeout=30,
    )
    assert "kind: pipeline" in config.text

    # Checkpoints and data went where the cluster said (durable), not into the job's temp copy.
    manifests = list(
        (cluster.state / "checkpoints" / "pipeline-teacher").glob("*/step-000000040/manifest.json")
    )
    assert len(manifests) == 1
    assert any((cluster.state / "datasets").iterdir())


def test_the_mlflow_ui_shows_the_run(cluster, cartpole, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI installs Debian's chromium (scripts/test.sh); it is missing")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    run = parent_run(cluster, "cartpole-followed")
    info = run["info"]
    page_url = f"{cluster.mlflow}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"
    shot = tmp_path / "mlflow-run.png"
    flags = [
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ]  # fmt: skip
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=browser, args=flags)
        context = chromium.new_context(
            http_credentials={
                "username": cluster.env["MLFLOW_TRACKING_USERNAME"],
                "password": cluster.env["MLFLOW_TRACKING_PASSWORD"],
            },
            viewport={"width": 1400, "height": 900},
        )
        page = context.new_page()
        page.goto(page_url)
        title = page.get_by_role("heading", name="cartpole-ui")
        title.wait_for(timeout=60_000)
        page.screenshot(path=str(shot))
        box = title.bounding_box()  # the name is inside the captured viewport
        assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 900
        assert page.get_by_text("Finished").first.is_visible()
        chromium.close()
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    saved = os.environ.get("UNLOCKED_SCREENSHOT_DIR")
    if saved:
        shutil.copy(shot, Path(saved) / shot.name)


def test_unlocked_submit_status_logs_and_stop(cluster, cartpole):
    assert "job cartpole-followed: SUCCEEDED" in cartpole.stdout
    status = cluster.run("unlocked status cartpole-followed")
    assert "job cartpole-followed: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = cluster.run("unlocked logs cartpole-followed")
    assert "stopped at step 2 (max_steps)" in logs.stdout

    # A long run, stopped: Ray sends SIGTERM, the run checkpoints and MLflow says KILLED.
    cluster.submit(
        "pipeline",
        "--no-wait --submission-id pipeline-stopped --set stop.max_steps=100000 "
        "--set checkpoint.every=100000 --set run.name=stopped",
    )
    deadline = time.monotonic() + 180
    while "step " not in cluster.run("unlocked logs pipeline-stopped").stdout:
        assert time.monotonic() < deadline, cluster.run("unlocked logs pipeline-stopped").stdout
        time.sleep(2)
    stop = cluster.run("unlocked stop pipeline-stopped")
    assert "stop requested" in stop.stdout, stop.stdout + stop.stderr
    follow = cluster.run("unlocked logs pipeline-stopped --follow", timeout=120)
    assert follow.returncode == 3 and "job pipeline-stopped: STOPPED" in follow.stdout
    assert "continue with: unlocked run" in follow.stdout
    assert parent_run(cluster, "pipeline-stopped")["info"]["status"] == "KILLED"
    assert list((cluster.state / "checkpoints" / "stopped").glob("*/step-*/manifest.json"))


def test_submit_checks_the_config_before_anything_reaches_the_cluster(cluster, tmp_path):
    bad = cluster.run("unlocked submit examples/pipeline.yaml --set strategy.blokcs=3")
    assert bad.returncode == 2
    assert "strategy.blokcs: unknown key" in bad.stderr and "Traceback" not in bad.stderr
    outside = tmp_path / "run.yaml"
    shutil.copy(REPO / "examples" / "pipeline.yaml", outside)
    moved = cluster.run(f"unlocked submit {outside}")
    assert moved.returncode == 2 and "must lie inside the working directory" in moved.stderr
    jobs = cluster.run("ray job list")
    assert "blokcs" not in jobs.stdout and str(outside) not in jobs.stdout


def test_a_job_whose_outputs_would_vanish_is_warned(cartpole):
    assert "a temporary copy deleted when the job ends" in cartpole.stdout
    assert "checkpoint.root=.unlocked/checkpoints" in cartpole.stdout


def test_secret_bearing_files_are_this_users_alone(cluster):
    """Tokens, passwords, MLflow's stores (mlflow-auth.db holds password hashes) and the
    logs: no group or other permission bit on any of them."""
    files = [
        "ray_token", "mlflow_password", "mlflow_flask_key", "basic_auth.ini", "env.sh",
        "mlflow.db", "mlflow-auth.db", "mlflow.log", "head.log",
    ]  # fmt: skip
    modes = {name: (cluster.state / name).stat().st_mode & 0o777 for name in files}
    assert all(mode & 0o077 == 0 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}
