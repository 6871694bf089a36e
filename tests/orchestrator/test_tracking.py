"""Routing of metrics to runs and the tracking URI default: no MLflow server needed."""

from __future__ import annotations

from orchestrator.tracking import default_tracking_uri, flatten, split_by_worker


def test_flatten_nested_config_into_dotted_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": "1",
        "a.c.d": "[1, 2]",
        "e": "None",
    }


def test_metrics_with_a_worker_prefix_go_to_that_worker():
    groups = split_by_worker(
        {"train/loss": 1.0, "block-0/train/local_loss": 2.0, "block-12/eval/aux_accuracy": 0.5}
    )
    assert groups == {
        None: {"train/loss": 1.0},
        "block-0": {"train/local_loss": 2.0},
        "block-12": {"eval/aux_accuracy": 0.5},
    }


def test_tracking_uri_prefers_config_then_environment(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(None) == "http://127.0.0.1:5000"
    assert default_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_a_run_leaves_the_tracking_uri_of_the_process_as_it_found_it(monkeypatch, tmp_path):
    """A second run in one process (a notebook) must not be sent to the first run's
    store, and MLflow's retry settings are the run's own while it lasts."""
    import os

    from orchestrator.config import validate_mapping
    from orchestrator.tracking import Tracker
    from tests.conftest import small_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    raw = small_config(tmp_path, tmp_path / "data")
    tracker = Tracker(validate_mapping(raw), "local", buffer=tmp_path / "buffer")
    tracker.start()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    tracker.finish()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_a_buffer_sits_in_a_local_checkpoint_folder_or_under_the_configured_root(
    tmp_path, monkeypatch
):
    from orchestrator.tracking import BUFFER_FOLDER, BUFFER_ROOT_ENV, buffer_folder

    assert buffer_folder(str(tmp_path / "run" / "a1")) == tmp_path / "run" / "a1" / BUFFER_FOLDER
    monkeypatch.setenv(BUFFER_ROOT_ENV, str(tmp_path / "buffers"))
    assert buffer_folder("s3://bucket/ck/run/a1") == tmp_path / "buffers" / "bucket/ck/run/a1"
