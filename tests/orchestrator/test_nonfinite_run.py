"""A run that diverges to NaN: stopped as failed by default, or rolled back with the learning
rate halved; end to end on the session's local Ray."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest

import unlocked
from orchestrator.cli import main
from orchestrator.errors import ConfigError
from orchestrator.nonfinite import NonFiniteStop
from tests.conftest import on_step, small_config, write_config
from tests.orchestrator.test_controller import mlflow_runs

pytestmark = pytest.mark.slow


def test_a_diverging_run_stops_as_failed_and_keeps_its_last_good_checkpoint(
    ray_local, tmp_path, dataset_root, capsys
):
    raw = small_config(
        tmp_path,
        dataset_root,
        strategy={"optimizer": {"kind": "sgd", "lr": 1000.0}},  # NaN at step 2
        checkpoint={"every": 1, "keep": 2},
    )
    assert main(["run", str(write_config(tmp_path, raw))]) == 1

    err = capsys.readouterr().err
    [message] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert message.startswith("error: training diverged at step 2: train/loss=nan")
    attempt = next((tmp_path / "ckpt" / "test-run").iterdir())
    assert f"the last good checkpoint is kept in {attempt} (newest: step 1)" in message
    assert "Traceback" not in err
    assert [p.name for p in attempt.iterdir()] == ["step-000000001"]

    client, parents, _ = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FAILED"
    [event] = client.get_metric_history(parents[0].info.run_id, "system/nonfinite_events")
    assert (event.step, event.value) == (2, 1.0)
    [loss] = client.get_metric_history(parents[0].info.run_id, "train/loss")[1:]
    assert loss.step == 2 and math.isnan(loss.value)


def backprop_run(tmp_path: Path, dataset_root: Path, lr: float, **run: Any) -> dict[str, Any]:
    raw = small_config(
        tmp_path,
        dataset_root,
        run={"name": "test-run", "seed": 0, **run},
        tracking={"enabled": False},
        stop={"max_steps": 4},
        checkpoint={"every": 1, "keep": 2},
    )
    return {
        **raw,
        "strategy": {
            "kind": "backprop",
            "batches_per_step": 4,
            "optimizer": {"kind": "sgd", "lr": lr},
        },
    }


def test_rollback_halves_the_learning_rate_until_the_run_trains(
    ray_local, tmp_path, dataset_root, caplog
):
    rates: list[float] = []
    raw = backprop_run(tmp_path, dataset_root, 40.0, nonfinite="rollback", max_rollbacks=3)
    with caplog.at_level(logging.WARNING, logger="unlocked"):
        result = unlocked.run(
            raw, callbacks=[on_step(lambda run, s, m: rates.append(run.strategy.lr))]
        )

    assert result.step == 4 and all(math.isfinite(v) for v in result.metrics.values())
    rollbacks = [m for m in caplog.messages if "rolling back to checkpoint step 1" in m]
    assert rollbacks and "not finite at step 2: train/loss=nan" in rollbacks[0]
    assert rates[0] == 40.0 and rates[-1] == 40.0 / 2 ** len(rollbacks)
    assert [s for s, _ in result.history] == [1, 2, 3, 4]  # no diverged step among them


def test_rollbacks_run_out_and_the_run_stops(ray_local, tmp_path, dataset_root):
    raw = backprop_run(tmp_path, dataset_root, 1000.0, nonfinite="rollback", max_rollbacks=1)
    with pytest.raises(NonFiniteStop, match=r"after 1 rollback\(s\)"):
        unlocked.run(raw)


def test_rollback_is_refused_for_pbt_when_the_config_is_validated(tmp_path, dataset_root):
    raw = small_config(tmp_path, dataset_root, run={"name": "r", "nonfinite": "rollback"})
    raw["strategy"] = {"kind": "pbt", "population": 2, "inner": {"kind": "backprop"}}
    with pytest.raises(ConfigError, match="run.nonfinite: 'rollback' halves the learning rate"):
        unlocked.load_config(raw)
