"""MeZO / SPSA end to end on a local Ray, and the configs it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import unlocked
from orchestrator.config import validate_mapping
from orchestrator.errors import ConfigError


def zo_config(tmp_path: Path, dataset_root: Path, **strategy: Any) -> dict[str, Any]:
    return {
        "run": {"name": "zo-test", "seed": 0},
        "strategy": {
            "kind": "zo",
            "lr": 0.05,
            "eps": 1e-3,
            "batches_per_step": 8,
            "workers": 2,
            "checksum_every": 1,
            **strategy,
        },
        "model": {"hidden": [32], "activation": "tanh", "norm": "none"},
        "data": {"dataset": "digits", "batch_size": 64, "root": str(dataset_root)},
        "tracking": {"enabled": False},
        "checkpoint": {"root": str(tmp_path / "ckpt"), "every": 2},
        "stop": {"max_steps": 2},
        "eval": {"every": 2, "max_batches": 2},
    }


def test_two_workers_train_in_place_with_only_scalars_crossing(ray_local, tmp_path, dataset_root):
    """16 in-place updates on 2 workers: the loss falls, the replicas never drift from
    the reference, and a step sends a few KiB whatever the model's size."""
    raw = zo_config(tmp_path, dataset_root, in_place=True, directions=2)
    result = unlocked.run(raw)
    assert result.step == 2
    seen = [metrics for _, metrics in result.history]
    assert seen[-1]["train/loss"] < seen[0]["train/loss"]
    assert all(m["system/resynced_workers"] == 0 for m in seen)
    assert seen[0]["system/bytes_per_step"] < 10 * 4096
    assert 0.0 <= result.metrics["eval/accuracy"] <= 1.0
    assert set(result.peak_training_bytes) == {"replica-0", "replica-1"}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"model": {"kind": "mlp", "norm": "batchnorm"}}, "model.norm: 'batchnorm' is not allowed"),
        ({"model": {"kind": "mlp", "dropout": 0.1}}, "model.dropout: 0.1 is not allowed"),
        ({"strategy": {"workers": 100}}, "strategy.workers: 100 workers share batches"),
    ],
    ids=["batchnorm", "dropout", "workers"],
)
def test_a_config_zo_cannot_train_is_refused_with_the_fix(tmp_path, dataset_root, section, message):
    raw = zo_config(tmp_path, dataset_root)
    for name, values in section.items():
        raw[name] = {**raw[name], **values}
    with pytest.raises(ConfigError, match=message):
        validate_mapping(raw)


def test_a_resnet_is_refused_for_its_batch_norm(tmp_path, dataset_root):
    raw = zo_config(tmp_path, dataset_root)
    raw["model"] = {"kind": "resnet", "depth": 8}
    raw["data"] = {**raw["data"], "dataset": "digits-images"}
    with pytest.raises(ConfigError, match="'resnet' cannot be trained by strategy.kind zo"):
        validate_mapping(raw)


@pytest.mark.slow
def test_a_killed_worker_is_rebuilt_and_the_replicas_agree(ray_local, tmp_path, dataset_root):
    """A worker killed at step 3: the run goes back to the step-2 checkpoint, rebuilds it,
    and ends with every replica bit-identical to the driver's reference."""
    import ray

    from tests.conftest import on_step

    killed, final = [], {}

    def kill_then_check(run: Any, step: int, metrics: dict[str, float]) -> None:
        strategy = run.strategy
        if step == 3 and not killed:
            killed.append(step)
            ray.kill(strategy.workers[1])
        if step == 4:
            final["reference"] = strategy.reference.checksum()
            final["workers"] = ray.get([w.checksum.remote() for w in strategy.workers])

    raw = zo_config(tmp_path, dataset_root, in_place=True)
    raw["stop"] = {"max_steps": 4}
    result = unlocked.run(raw, callbacks=[on_step(kill_then_check)])
    assert killed and result.failures == 1 and result.step == 4
    assert final["workers"] == [final["reference"]] * 2
