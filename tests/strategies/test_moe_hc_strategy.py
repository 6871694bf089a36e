"""PI-HC-MoE: in-process training, then two expert actors end to end on a local Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest
import ray

import unlocked
from orchestrator.config import validate_mapping
from orchestrator.errors import ConfigError
from strategies.config import OptimizerConfig
from strategies.moe_hc.hard_constraint import SolverOptions
from strategies.moe_hc.mixture import Decomposition
from strategies.moe_hc.pde.problems import HeatConfig
from strategies.moe_hc.training import BasisTrainer, Sampling, solve_task
from tests.conftest import on_step


def heat(root: Path) -> HeatConfig:
    return HeatConfig(root=str(root), train_instances=16, test_instances=4, nx=24, nt=9)


def trainer(root: Path, splits=(1, 1), constraint="hard", outer_loss="data") -> BasisTrainer:
    return BasisTrainer(
        problem=heat(root),
        network={"num_basis": 16, "width": 32, "depth": 2},
        optimizer=OptimizerConfig(lr=1e-2),
        decomposition=Decomposition((0.0, 0.0), (1.0, 1.0), splits, 0.1),
        sampling=Sampling(instances=4, interior=128, boundary=16, data=64, residual=64),
        constraint=constraint,
        continuity_weight=1.0,
        soft_weight=1.0,
        seed=0,
        outer_loss=outer_loss,
    )


def evaluate(model: BasisTrainer, options: SolverOptions) -> dict[str, float]:
    if model.constraint == "soft":
        return model.evaluate(None)
    return model.evaluate(
        [solve_task(model.problem, t, options).omega for t in model.evaluation_tasks()]
    )


@pytest.mark.parametrize(
    ("splits", "constraint", "outer_loss"),
    [
        ((1, 1), "hard", "data"),
        ((2, 1), "hard", "data"),
        ((2, 1), "hard", "residual"),
        ((1, 1), "soft", "data"),
    ],
)
def test_training_in_process_lowers_the_held_out_error(tmp_path, splits, constraint, outer_loss):
    """The residual loss learns the solution too, from the physics alone (no data)."""
    model = trainer(tmp_path, splits, constraint, outer_loss)
    options = SolverOptions(max_iterations=20)
    before = evaluate(model, options)["eval/rel_l2"]
    for t in range(100):
        metrics = model.local_step(t, options) if constraint == "hard" else model.soft_step(t)
    after = evaluate(model, options)
    assert after["eval/rel_l2"] < 0.75 * before, (before, after)
    if constraint == "hard":
        assert metrics["expert-0/train/converged_fraction"] == 1.0
        assert ("expert-1/train/solve_s" in metrics) == (splits == (2, 1))


def test_state_round_trip_continues_identically(tmp_path):
    options = SolverOptions(max_iterations=20)
    a = trainer(tmp_path)
    for t in range(3):
        a.local_step(t, options)
    b = trainer(tmp_path)
    b.load(a.state())
    first, second = a.local_step(3, options), b.local_step(3, options)
    timings = {k for k in first if k.endswith("solve_s")}
    assert {k: v for k, v in first.items() if k not in timings} == {
        k: v for k, v in second.items() if k not in timings
    }


def moe_config(tmp_path: Path, **strategy: Any) -> dict[str, Any]:
    return {
        "run": {"name": "moe-test", "seed": 0},
        "strategy": {
            "kind": "moe_hc",
            "problem": heat(tmp_path / "data").model_dump(),
            "experts": {"x": 2},
            "basis": {"functions": 16, "width": 32, "depth": 2},
            "constraint_points": 128,
            "boundary_points": 16,
            "data_points": 64,
            "batches_per_step": 3,
            **strategy,
        },
        "tracking": {
            "uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
            "experiment": "tests",
            "system_metrics": False,
        },
        "checkpoint": {"root": str(tmp_path / "ckpt"), "every": 2},
        "stop": {"max_steps": 6},
        "eval": {"every": 3},
    }


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy.experts.y: 'heat' has no coordinate 'y'"):
        validate_mapping(moe_config(tmp_path, experts={"y": 2}))
    with pytest.raises(ConfigError, match="soft-constraint baseline solves nothing"):
        validate_mapping(moe_config(tmp_path, constraint="soft"))
    with pytest.raises(ConfigError, match="instances_per_batch: 40"):
        validate_mapping(moe_config(tmp_path, instances_per_batch=40))
    assert validate_mapping(moe_config(tmp_path)).strategy.num_workers() == 3


@pytest.mark.slow
def test_two_experts_train_end_to_end_and_log_to_mlflow(ray_local, tmp_path):
    result = unlocked.run(moe_config(tmp_path))
    assert result.step == 6 and result.failures == 0
    first, last = result.history[0][1], result.history[-1][1]
    assert last["train/data_loss"] < first["train/data_loss"]
    assert 0 < result.metrics["eval/rel_l2"] < 1
    client = mlflow.MlflowClient(result.tracking_uri)
    children = client.search_runs(
        [client.get_run(result.mlflow_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'",
    )
    nested = {c.info.run_name: c.data.metrics for c in children}
    assert {"expert-0", "expert-1", "basis-0"} <= set(nested)
    for expert in ("expert-0", "expert-1"):
        assert {"train/solve_s", "train/solver_iterations", "system/peak_training_mb"} <= set(
            nested[expert]
        )
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "moe_hc")}
    assert artifacts == {"moe_hc/fields.png"}
    history = client.get_metric_history(result.mlflow_run_id, "eval/pde_residual")
    assert [m.step for m in history] == [3, 6]


@pytest.mark.slow
def test_a_killed_expert_is_rebuilt_and_training_continues(ray_local, tmp_path):
    killed = []

    def kill_expert(run, step: int, metrics: dict) -> None:
        if step == 3 and not killed:
            killed.append(True)
            ray.kill(run.strategy.experts[1], no_restart=True)

    raw = moe_config(tmp_path)
    raw["tracking"] = {"enabled": False}
    result = unlocked.run(raw, callbacks=[on_step(kill_expert)])
    assert killed and result.failures == 1 and result.step == 6
    assert [s for s, _ in result.history] == [1, 2, 3, 4, 5, 6]  # 3 replayed from checkpoint 2
