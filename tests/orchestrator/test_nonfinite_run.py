"""A run that diverges to NaN: stopped as failed by default, or rolled back with the learning
rate halved; end to end on the session's local Ray."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import unlocked
from orchestrator.cli import main
from orchestrator.data import footers
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


def poisoned_tables(tmp_path: Path) -> tuple[Path, Path]:
    """A training table with one NaN feature (in one batch of every epoch) and a clean
    held-out one."""
    rng = np.random.default_rng(0)

    def table(rows: int) -> pa.Table:
        x = rng.normal(size=(rows, 8)).astype("float32")
        return pa.table(
            {
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8),
                "y": (x[:, 0] > 0).astype("int64"),
            }
        )

    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    poisoned = table(256)
    column = poisoned.column("x").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).copy()
    values[3 * 8 + 2] = np.nan
    x = pa.FixedSizeListArray.from_arrays(pa.array(values), 8)
    pq.write_table(poisoned.set_column(0, "x", x), train)
    pq.write_table(table(64), test)
    return train, test


def test_skip_leaves_a_poisoned_batch_out_and_the_run_finishes(
    ray_local, tmp_path, dataset_root, monkeypatch
):
    # The NaN must reach a worker: the check before the run would refuse the table.
    monkeypatch.setattr(footers, "non_finite_rows", lambda column: 0)
    train, test = poisoned_tables(tmp_path)
    raw = backprop_run(tmp_path, dataset_root, 0.05, nonfinite="skip")
    raw["data"] = {"dataset": None, "path": str(train), "test_path": str(test), "batch_size": 32}

    result = unlocked.run(raw)

    assert result.step == 4 and result.stopped_by == "max_steps"
    assert all(math.isfinite(v) for v in result.metrics.values())
    skipped = [m["system/nonfinite_skipped"] for _, m in result.history]
    assert sum(skipped) == 2  # 16 batches, two epochs of 8: the NaN row once in each
    assert all(math.isfinite(m["train/loss"]) for _, m in result.history)


def test_skip_is_refused_for_moe_hc_when_the_config_is_validated() -> None:
    raw = {"run": {"nonfinite": "skip"}, "strategy": {"kind": "moe_hc"}}
    with pytest.raises(ConfigError, match="run.nonfinite: 'skip' is not possible for strategy"):
        unlocked.load_config(raw)
