"""End to end on a local Ray with real MLflow: training, recovery, resume, artifacts."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

import unlocked
from orchestrator.config import validate_mapping
from orchestrator.controller import Controller
from tests.conftest import on_step, small_config, write_config
from unlocked import Callback

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def mlflow_runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def logged_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_pipeline_learns_and_mlflow_holds_the_run(ray_local, tmp_path, dataset_root):
    raw = small_config(tmp_path, dataset_root, stop={"max_steps": 24}, eval={"every": 8})
    result = unlocked.run(raw)
    assert result.step == 24 and result.failures == 0
    assert result.metrics["eval/accuracy"] >= 0.85, result.metrics
    for k in range(3):
        assert 0.0 <= result.metrics[f"block-{k}/eval/aux_accuracy"] <= 1.0

    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["strategy.blocks"] == "3"
    assert parent.data.tags["strategy"] == "pipeline"
    assert logged_steps(client, parent.info.run_id, "train/loss") == list(range(1, 25))
    assert {c.info.run_name for c in children} == {"block-0", "block-1", "block-2"}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {
            "train/local_loss",
            "train/aux_accuracy",
            "train/samples_per_s",
            "system/busy_fraction",
        } <= set(child.data.metrics)
        assert child.data.metrics["system/peak_training_mb"] > 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "model", "plots"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(parent.info.run_id, "model")}
    assert model_files == {"model/model.pt", "model/model.yaml"}
    plot_files = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plot_files == {"plots/learning_curves.png", "plots/worker_timeline.png"}


def test_exported_model_matches_the_pipeline_accuracy(ray_local, tmp_path, dataset_root):
    import torch

    from orchestrator.data.source import resolve_dataset
    from orchestrator.data.stream import BatchStream

    raw = small_config(tmp_path, dataset_root, stop={"max_steps": 8}, tracking={"enabled": False})
    config = validate_mapping(raw)
    captured = {}

    def export_at_8(run, step: int, metrics: dict) -> None:
        if step == 8:
            captured.update(model=run.strategy.export_model())

    result = Controller(config, callbacks=[on_step(export_at_8)]).run()
    info = resolve_dataset(config.data)
    network = captured["model"].eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in BatchStream(info, "test", 64, 0):
            correct += int((network(x).argmax(1) == y).sum())
            total += len(y)
    assert correct / total == pytest.approx(result.metrics["eval/accuracy"], abs=1e-9)


def test_a_killed_block_is_restored_and_no_step_is_logged_twice(ray_local, tmp_path, dataset_root):
    raw = small_config(tmp_path, dataset_root, stop={"max_steps": 8})
    killed = []

    def kill_block_once(run, step: int, metrics: dict) -> None:
        if step == 3 and not killed:
            killed.append(run.strategy.workers[1])
            ray.kill(run.strategy.workers[1])

    result = unlocked.run(raw, callbacks=[on_step(kill_block_once)])
    assert killed and result.failures == 1 and result.step == 8
    # Step 3 ran twice (before the kill, and replayed from the step-2 checkpoint); the
    # history, as MLflow, holds it once.
    assert [s for s, _ in result.history] == list(range(1, 9))
    client, parents, children = mlflow_runs(tmp_path)
    run_id = parents[0].info.run_id
    steps = logged_steps(client, run_id, "train/loss")
    assert steps == list(range(1, 9))
    assert logged_steps(client, run_id, "system/failures") == [2]
    for child in children:
        counts = collections.Counter(logged_steps(client, child.info.run_id, "train/local_loss"))
        assert set(counts.values()) == {1}


def test_a_block_lost_after_the_last_step_is_recovered_for_the_final_evaluation(
    ray_local, tmp_path, dataset_root
):
    # Step 2 is not an evaluation step, so the run evaluates once more after it: the
    # worker is gone by then, and the run goes back to its step-2 checkpoint.
    raw = small_config(tmp_path, dataset_root, stop={"max_steps": 2})  # eval every 4

    def kill_after_the_last_step(run, step: int, metrics: dict) -> None:
        if step == 2 and run.failures == 0:
            ray.kill(run.strategy.workers[1])

    result = unlocked.run(raw, callbacks=[on_step(kill_after_the_last_step)])
    assert result.failures == 1 and result.step == 2 and result.stopped_by == "max_steps"
    assert "eval/accuracy" in result.metrics and "train/loss" in result.metrics
    client, parents, _ = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FINISHED"
    assert logged_steps(client, parents[0].info.run_id, "train/loss") == [1, 2]
    assert logged_steps(client, parents[0].info.run_id, "eval/accuracy") == [2]


def test_a_block_lost_while_the_model_is_exported_is_recovered_and_published(
    ray_local, tmp_path, dataset_root, monkeypatch
):
    from strategies.pipeline.driver import PipelineStrategy

    raw = small_config(tmp_path, dataset_root, stop={"max_steps": 2})
    real = PipelineStrategy.export_model

    def export_after_a_loss(self):
        if not getattr(export_after_a_loss, "fired", False):
            export_after_a_loss.fired = True
            ray.kill(self.workers[1])
        return real(self)

    monkeypatch.setattr(PipelineStrategy, "export_model", export_after_a_loss)
    result = unlocked.run(raw)
    assert result.failures == 1 and result.step == 2
    client, parents, children = mlflow_runs(tmp_path)
    run_id = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
    assert logged_steps(client, run_id, "eval/accuracy") == [2]
    for child in children:  # the peaks are logged once, before the loss
        assert logged_steps(client, child.info.run_id, "system/peak_training_mb") == [2]
    assert "model" in {a.path for a in client.list_artifacts(run_id)}


def test_too_many_failures_fail_the_run(ray_local, tmp_path, dataset_root):
    from orchestrator.errors import RunFailed

    raw = small_config(
        tmp_path, dataset_root, resources={"max_failures": 1}, tracking={"enabled": False}
    )

    def always_kill(run, step: int, metrics: dict) -> None:
        ray.kill(run.strategy.workers[0])

    with pytest.raises(RunFailed, match="max_failures=1"):
        unlocked.run(raw, callbacks=[on_step(always_kill)])


def test_backprop_baseline_trains(ray_local, tmp_path, dataset_root):
    raw = small_config(tmp_path, dataset_root, stop={"max_steps": 16}, eval={"every": 8})
    raw["strategy"] = {"kind": "backprop", "batches_per_step": 8, "optimizer": {"lr": 0.002}}
    result = unlocked.run(raw)
    assert result.metrics["eval/accuracy"] >= 0.85
    client, parents, children = mlflow_runs(tmp_path)
    assert [c.info.run_name for c in children] == ["trainer-0"]


def _cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_resume_after_the_driver_is_killed(tmp_path, dataset_root):
    raw = small_config(
        tmp_path,
        dataset_root,
        stop={"max_steps": 40},
        strategy={"batches_per_step": 4},
        checkpoint={"every": 2, "keep": 2},
    )
    config_path = write_config(tmp_path, raw)
    first = _cli(["run", str(config_path)], tmp_path)
    deadline = time.monotonic() + 180
    while not list((tmp_path / "ckpt").glob("test-run/*/step-000000004/manifest.json")):
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    second = _cli(["run", str(config_path), "--resume"], tmp_path)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert "stopped at step 40" in out

    client, parents, _ = mlflow_runs(tmp_path)
    assert len(parents) == 1, "the resumed run continues the same MLflow run"
    assert parents[0].info.status == "FINISHED"
    assert logged_steps(client, parents[0].info.run_id, "train/loss") == list(range(1, 41))


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path, dataset_root, capsys):
    from orchestrator.cli import main

    path = write_config(tmp_path, small_config(tmp_path, dataset_root))
    assert main(["run", str(path), "--resume"]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err


def test_sigterm_checkpoints_the_current_step_and_resume_finishes(tmp_path, dataset_root):
    raw = small_config(
        tmp_path,
        dataset_root,
        stop={"max_steps": 200},
        strategy={"batches_per_step": 4},
        checkpoint={"every": 50},
    )
    config_path = write_config(tmp_path, raw)
    run = _cli(["run", str(config_path)], tmp_path)
    # Wait for the first step's progress line. Reading the run's SQLite store from here
    # instead would race the run's own creation of its tables.
    seen = []
    while not any(" INFO step " in line for line in seen):
        seen.append(run.stdout.readline())
        assert seen[-1], "the run ended before its first step: " + "".join(seen)
    os.kill(run.pid, signal.SIGTERM)
    out, _ = run.communicate(timeout=120)
    out = "".join(seen) + out
    assert run.returncode == 143, out
    assert "--resume" in out
    saved = sorted((tmp_path / "ckpt").glob("test-run/*/step-*/manifest.json"))
    assert saved, "SIGTERM must leave a checkpoint"
    stopped_at = int(saved[-1].parent.name.removeprefix("step-"))
    assert 0 < stopped_at < 200 and stopped_at % 50 != 0

    resumed = _cli(
        ["run", str(config_path), "--resume", "--set", "stop.max_steps=" + str(stopped_at + 3)],
        tmp_path,
    )
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    client, parents, _ = mlflow_runs(tmp_path)
    steps = logged_steps(client, parents[0].info.run_id, "train/loss")
    assert steps == list(range(1, stopped_at + 4))


def test_resume_refuses_a_checkpoint_of_another_model_config(
    ray_local, tmp_path, dataset_root, capsys
):
    from orchestrator.cli import main

    raw = small_config(tmp_path, dataset_root, stop={"max_steps": 2}, tracking={"enabled": False})
    unlocked.run(raw)
    path = write_config(tmp_path, raw)
    assert main(["run", str(path), "--resume", "--set", "model.hidden=[32,32,32,32]"]) == 2
    assert "different strategy, model or engine section" in capsys.readouterr().err


def test_the_final_checkpoint_does_not_rewrite_a_good_one(ray_local, tmp_path, dataset_root):
    raw = small_config(tmp_path, dataset_root, stop={"max_steps": 4}, tracking={"enabled": False})
    saved: list[int] = []

    class Checkpoints(Callback):
        def on_checkpoint(self, run, step: int, path: str) -> None:
            saved.append(step)

    unlocked.run(raw, callbacks=[Checkpoints()])
    assert saved == [2, 4]


def test_a_batch_larger_than_the_data_is_a_config_error(tmp_path, dataset_root, capsys):
    from orchestrator.cli import main

    raw = small_config(tmp_path, dataset_root, data={"batch_size": 4096})
    path = write_config(tmp_path, raw)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size: 4096" in err and "Traceback" not in err
