"""The pieces of `unlocked submit` and the durable locations, without a cluster."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.jobs import entrypoint, job_address, load_runtime_env
from orchestrator.locations import ephemeral_locations, job_submission_id

REPO = Path(__file__).resolve().parents[2]


def test_the_address_is_the_dashboards_and_an_explicit_one_wins(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    assert job_address("http://head:8265") == "http://head:8265"
    assert job_address(None) == "http://from-env:8265"
    assert job_address("head:8265") == "http://head:8265"
    with pytest.raises(UserError, match="dashboard's HTTP address"):
        job_address("ray://head:10001")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(UserError, match="--address http://HEAD:8265"):
        job_address(None)


def test_the_shipped_runtime_env_uploads_the_code_and_reads_the_cluster_env():
    env = load_runtime_env(REPO / "deploy" / "runtime_env.yaml", [])
    assert env["working_dir"] == "."
    assert {".venv/", ".git/", ".unlocked/", "mlruns.db"} <= set(env["excludes"])
    # Values are expanded on the cluster, so no value of this machine is sent.
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "${MLFLOW_TRACKING_URI}"
    assert env["env_vars"]["UNLOCKED_CHECKPOINT_ROOT"] == "${UNLOCKED_CHECKPOINT_ROOT}"


def test_env_additions_override_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump({"working_dir": ".", "env_vars": {"A": "1"}}))
    env = load_runtime_env(path, ["A=2", "B=x=y"])
    assert env["env_vars"] == {"A": "2", "B": "x=y"}
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_runtime_env(path, ["NOVALUE"])
    path.write_text(yaml.safe_dump({"working_dir": ".", "pip": 3}))
    with pytest.raises(UserError, match="not a valid Ray runtime environment"):
        load_runtime_env(path, [])
    with pytest.raises(UserError, match="does not exist"):
        load_runtime_env(tmp_path / "missing.yaml", [])


def test_the_entrypoint_names_the_config_inside_the_working_dir(tmp_path):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "my run.yaml"
    config.touch()
    command = entrypoint(config, tmp_path, ["stop.max_steps=5", "run.name=a b"])
    assert shlex.split(command) == [
        "python", "-m", "orchestrator", "run", "configs/my run.yaml",
        "--set", "stop.max_steps=5", "--set", "run.name=a b",
    ]  # fmt: skip
    with pytest.raises(UserError, match="must lie inside the working directory"):
        entrypoint(tmp_path.parent / "elsewhere.yaml", tmp_path, [])


def test_the_submission_id_comes_from_rays_job_config(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_submission_id() is None
    config = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    assert job_submission_id() == "raysubmit_abc"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert job_submission_id() is None


def test_locations_inside_the_working_dir_are_the_ephemeral_ones(tmp_path):
    found = ephemeral_locations(
        {
            "tracking.uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
            "checkpoint.root": ".unlocked/checkpoints",
            "data.root": "s3://bucket/data",
            "elsewhere": "/mnt/shared/ckpt",
            "escaping": "../outside",
            "server": "http://mlflow:5000",
        },
        tmp_path,
    )
    assert found == [
        f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
        "checkpoint.root=.unlocked/checkpoints",
    ]


def test_unset_roots_default_to_the_nodes_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UNLOCKED_CHECKPOINT_ROOT", "s3://bucket/ckpt")
    monkeypatch.setenv("UNLOCKED_DATA_ROOT", "/mnt/data")
    config = load_config(REPO / "examples" / "pipeline.yaml")
    assert config.checkpoint.root == "s3://bucket/ckpt"
    assert config.data.root == "/mnt/data"
    heat = load_config(REPO / "examples" / "moe-hc-heat.yaml")
    assert heat.strategy.problem.root == "/mnt/data"
    pinned = load_config(REPO / "examples" / "pipeline.yaml", ["checkpoint.root=/x"])
    assert pinned.checkpoint.root == "/x"
    monkeypatch.delenv("UNLOCKED_CHECKPOINT_ROOT")
    assert load_config(REPO / "examples" / "pipeline.yaml").checkpoint.root == (
        ".unlocked/checkpoints"
    )
