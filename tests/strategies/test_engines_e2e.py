"""Engines end to end on local Ray: a pipeline under Accelerate and the backprop baseline
under DeepSpeed ZeRO learn the digits, and a DeepSpeed run stopped and resumed from its
checkpoint ends where the run that never stopped ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import unlocked
from tests.conftest import on_step, small_config


def falls(result: unlocked.RunResult, key: str) -> bool:
    losses = [metrics[key] for _, metrics in result.history]
    return sum(losses[-2:]) < sum(losses[:2])


def backprop_run(tmp_path: Path, dataset_root: Path, name: str, **engine: Any) -> dict[str, Any]:
    raw = small_config(
        tmp_path,
        dataset_root,
        tracking={"enabled": False},
        stop={"max_steps": 6},
        eval={"every": 3},
        engine=engine,
    )
    raw["run"]["name"] = name
    raw["strategy"] = {"kind": "backprop", "batches_per_step": 4, "optimizer": {"lr": 0.003}}
    return raw


def test_a_pipeline_learns_under_accelerate_in_bf16(ray_local, tmp_path, dataset_root):
    raw = small_config(
        tmp_path,
        dataset_root,
        strategy={"blocks": 2, "batches_per_step": 4, "max_in_flight": 2},
        tracking={"enabled": False},
        stop={"max_steps": 6},
        eval={"every": 3},
        engine={"kind": "accelerate", "precision": "bf16", "grad_accumulation": 2},
    )
    result = unlocked.run(raw)
    assert falls(result, "train/loss")
    assert falls(result, "block-0/train/local_loss")
    assert result.metrics["eval/accuracy"] > 0.5  # chance: 0.1


@pytest.mark.slow
def test_backprop_under_deepspeed_zero2_resumes_to_the_uninterrupted_run(
    ray_local, tmp_path, dataset_root
):
    engine = {"kind": "deepspeed", "zero_stage": 2, "grad_accumulation": 2}
    whole = unlocked.run(backprop_run(tmp_path, dataset_root, "whole", **engine))
    assert falls(whole, "train/loss")
    assert whole.metrics["eval/accuracy"] > 0.5

    def interrupt(run: Any, step: int, _metrics: dict) -> None:
        if step == 2:  # a checkpoint is written every 2 steps
            run.controller.stop_signal = "SIGTERM"

    split = backprop_run(tmp_path, dataset_root, "split", **engine)
    first = unlocked.run(split, callbacks=[on_step(interrupt)])
    assert first.step == 2 and first.stopped_by == "SIGTERM"
    resumed = unlocked.run(backprop_run(tmp_path, dataset_root, "split", **engine), resume=True)
    assert resumed.step == 6
    keys = ["train/loss", "train/accuracy", "eval/loss", "eval/accuracy"]
    assert {k: resumed.metrics[k] for k in keys} == {k: whole.metrics[k] for k in keys}
