"""Every shipped example is a valid, complete run config."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.data.source import check_dataset

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_is_an_example_per_strategy():
    from strategies.registry import strategy_configs

    kinds = {load_config(path).strategy.kind for path in EXAMPLES}
    assert kinds == set(strategy_configs())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates(path):
    config = load_config(path)
    assert config.run.name
    if config.data is not None and config.data.path is not None:
        check_dataset(config.data)


@pytest.mark.slow
def test_the_python_api_example_runs(tmp_path):
    """examples/python_api.py as a user runs it (shortened), from a directory of their own."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    # As a user's shell: no tracking URI that an earlier test's MLflow client exported.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(repo)
    command = [sys.executable, str(repo / "examples" / "python_api.py")]
    command += ["--set", "stop.max_steps=4", "--set", "eval.every=2", "--set", "checkpoint.every=2"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint of step 4:" in done.stdout
    assert "best eval/accuracy" in done.stdout and "of 4" in done.stdout
    assert (tmp_path / "mlruns.db").is_file()
    bad = subprocess.run(
        command + ["--set", "stop.max_step=4"],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
    )
    assert bad.returncode == 2 and "stop.max_step: unknown key" in bad.stderr


@pytest.mark.slow
def test_the_custom_module_example_runs(tmp_path):
    """examples/custom-module.py (shortened): a user's own network, given as a function
    through the Python API, trains as a pipeline and end to end."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(repo)
    command = [sys.executable, str(repo / "examples" / "custom-module.py")]
    command += [
        "--set",
        "stop.max_steps=2",
        "--set",
        "eval.every=2",
        "--set",
        "tracking.enabled=false",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("custom-pipeline", "custom-backprop"):
        line = next(line for line in done.stdout.splitlines() if line.startswith(name))
        assert float(line.rsplit(" ", 1)[1]) > 0.2  # chance: 0.1
