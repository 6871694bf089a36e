"""Conv nets and transformers as update-unlocked pipelines, end to end on local Ray."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import ray

import unlocked
from tests.conftest import on_step, small_config

RESNET = {"kind": "resnet", "blocks_per_stage": 1, "width": 8}  # 3 residual blocks
TRANSFORMER = {"kind": "transformer", "d_model": 32, "layers": 2, "heads": 2}


def family_run(
    tmp_path: Path, dataset_root: Path, model: dict[str, Any], **sections: Any
) -> dict[str, Any]:
    """``small_config``'s pipeline, 2 blocks with AugLocal heads, on another model family
    (its section replaced, not merged into the MLP's)."""
    pipeline = {"blocks": 2, "aux_head": "augmented", "aux_depth": 1, "batches_per_step": 4}
    sections["strategy"] = {**pipeline, **sections.get("strategy", {})}
    raw = small_config(tmp_path, dataset_root, tracking={"enabled": False}, **sections)
    return {**raw, "model": model}


def resnet_run(tmp_path: Path, dataset_root: Path, **sections: Any) -> dict[str, Any]:
    data = {"dataset": "digits-images", "batch_size": 64, "root": str(dataset_root)}
    return family_run(tmp_path, dataset_root, RESNET, data=data, **sections)


def falls(result: unlocked.RunResult, key: str) -> bool:
    losses = [metrics[key] for _, metrics in result.history]
    return sum(losses[-2:]) < sum(losses[:2])


def test_a_two_block_resnet_pipeline_learns_the_digits(ray_local, tmp_path, dataset_root):
    result = unlocked.run(resnet_run(tmp_path, dataset_root, stop={"max_steps": 8}))
    assert falls(result, "train/loss")
    assert falls(result, "block-0/train/local_loss")  # the AugLocal head of the first block
    assert result.metrics["eval/accuracy"] > 0.5  # chance: 0.1


def test_a_two_block_transformer_pipeline_learns_the_grammar(ray_local, tmp_path, dataset_root):
    raw = family_run(
        tmp_path,
        dataset_root,
        TRANSFORMER,
        data={
            "dataset": "grammar",
            "size": 20_000,
            "batch_size": 16,
            "text": {"context": 32},
            "root": str(dataset_root),
        },
        strategy={"optimizer": {"kind": "adam", "lr": 0.01}},
        stop={"max_steps": 8},
        eval={"every": 4, "max_batches": 8},
    )
    result = unlocked.run(raw)
    assert falls(result, "train/loss")
    bits = result.metrics["eval/bits_per_token"]
    assert bits == pytest.approx(result.metrics["eval/loss"] / math.log(2))
    assert bits < 5.0  # uniform over 256 bytes: 8 bits; letter frequencies alone: ~4.2


def test_a_killed_resnet_block_is_restored_to_the_uninterrupted_run(
    ray_local, tmp_path, dataset_root
):
    """Batch norm's running statistics, the optimizer and the augmentation stream all come
    back from the checkpoint: the run ends on the numbers of a run never interrupted."""
    sections = {"stop": {"max_steps": 6}, "checkpoint": {"every": 2, "keep": 2}}
    calm = unlocked.run(resnet_run(tmp_path / "calm", dataset_root, **sections))
    killed: list[Any] = []

    def kill_last_block_once(run: Any, step: int, metrics: dict[str, float]) -> None:
        if step == 3 and not killed:
            killed.append(run.strategy.workers[-1])
            ray.kill(run.strategy.workers[-1])

    raw = resnet_run(tmp_path / "killed", dataset_root, **sections)
    result = unlocked.run(raw, callbacks=[on_step(kill_last_block_once)])
    assert killed and result.failures == 1 and result.step == 6
    for key in ("eval/accuracy", "eval/loss", "block-0/eval/aux_accuracy"):
        assert result.metrics[key] == calm.metrics[key], key


def unchained(spec: Any) -> list[Any]:
    """A custom network whose second unit cannot take the first one's output."""
    from torch import nn

    return [nn.Linear(spec.shape[0], 16), nn.Linear(12, 8), nn.Linear(8, spec.num_classes)]


@pytest.mark.parametrize(
    "strategy",
    [
        {"kind": "pipeline", "blocks": 2},
        {"kind": "backprop"},
        {"kind": "eggroll", "population": 8, "workers": 1, "task": {"kind": "classification"}},
        {"kind": "pbt", "population": 2, "inner": {"kind": "backprop"}},
    ],
    ids=lambda s: s["kind"],
)
def test_a_custom_network_that_cannot_run_stops_the_run_before_anything_starts(
    tmp_path, dataset_root, strategy
):
    """The units are built and run once in the driver before Ray, a placement group or an
    MLflow run exists: no tracking store is ever created."""
    from orchestrator.errors import ConfigError

    raw = small_config(tmp_path, dataset_root)
    raw = {**raw, "strategy": strategy, "model": {"kind": "custom", "module": unchained}}
    with pytest.raises(ConfigError, match=r"unit 1 \(Linear\) cannot take input of shape"):
        unlocked.run(raw)
    assert not (tmp_path / "mlruns.db").exists()
