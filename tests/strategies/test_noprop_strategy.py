"""NoProp-DT end to end on a local Ray: two blocks, a learned embedding kept in step, and
configs the strategy cannot run refused before anything starts. (Its state restoring to
itself, which recovery relies on, is checked by test_contract.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
import torch

import unlocked
from orchestrator.errors import ConfigError
from strategies.base import metric_scope
from strategies.noprop.driver import summarize
from tests.conftest import on_step


def noprop_config(tmp_path: Path, dataset_root: Path, **strategy: Any) -> dict[str, Any]:
    return {
        "run": {"name": "noprop", "seed": 0},
        "strategy": {
            "kind": "noprop",
            "blocks": 2,
            "width": 16,
            "batches_per_step": 2,
            "embedding": "learned",
            "embedding_dim": 6,
            "embed_sync_every": 2,
            **strategy,
        },
        "model": {"hidden": [16]},
        "data": {"dataset": "digits", "batch_size": 64, "root": str(dataset_root)},
        "resources": {"cpus_per_worker": 1},
        "tracking": {"enabled": False},
        "checkpoint": {"root": str(tmp_path / "ckpt"), "every": 2},
        "stop": {"max_steps": 2},
        "eval": {"every": 2, "max_batches": 2},
    }


@pytest.mark.slow
def test_two_blocks_train_apart_and_share_the_learned_embedding(ray_local, tmp_path, dataset_root):
    seen: dict[int, Any] = {}

    def probe(run: Any, step: int, metrics: dict[str, float]) -> None:
        workers = run.strategy.workers
        seen[step] = (dict(metrics), ray.get([w.embedding.remote() for w in workers]))

    raw = noprop_config(tmp_path, dataset_root)
    result = unlocked.run(raw, callbacks=[on_step(probe)])
    assert result.step == 2
    first, last = seen[1][1]
    assert not torch.equal(first, last)  # block 2 trained W_Embed; not yet sent (every 2)
    metrics, (first, last) = seen[2]
    assert torch.equal(first, last) and first.shape == (10, 6)
    for key in ("block-1/train/local_loss", "block-2/train/denoise_mse", "train/samples_per_s"):
        assert key in metrics
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert set(result.peak_training_bytes) == {"block-1", "block-2"}


def test_the_step_metrics_are_scoped_and_train_loss_is_eq8():
    stats = [
        {"denoise": 1.0, "mse": 2.0, "head": 0.0, "correct": 0, "count": 8, "busy_s": 1.0},
        {"denoise": 3.0, "mse": 0.5, "head": 0.25, "correct": 6, "count": 8, "busy_s": 3.0},
    ]
    metrics = summarize(stats, wall_s=2.0)
    assert all(metric_scope(key) is not None for key in metrics)
    assert metrics["train/loss"] == (1.0 + 3.0) / 2 + 0.25
    assert metrics["block-2/train/local_loss"] == 3.25
    assert metrics["train/classifier_accuracy"] == 0.75
    assert metrics["train/samples_per_s"] == 4.0
    assert metrics["block-2/system/busy_fraction"] == 1.0


def test_a_onehot_embedding_of_another_size_is_refused_before_ray(tmp_path, dataset_root):
    config = noprop_config(tmp_path, dataset_root, embedding="onehot", embedding_dim=6)
    with pytest.raises(ConfigError, match=r"strategy.embedding_dim: 6 with embedding: onehot"):
        unlocked.run(config)


def test_a_model_family_noprop_does_not_read_is_refused(tmp_path, dataset_root):
    config = noprop_config(tmp_path, dataset_root)
    config["model"] = {"kind": "resnet"}
    config["data"]["dataset"] = "digits-images"
    with pytest.raises(ConfigError, match="model.kind: 'resnet' is not used by strategy 'noprop'"):
        unlocked.load_config(config)


@pytest.mark.slow
def test_a_killed_block_is_rebuilt_with_its_weights_and_embedding(
    ray_local, tmp_path, dataset_root
):
    """Block 1 killed at step 3: the run restores the step-2 checkpoint into a rebuilt
    block and goes on; at step 4 the embedding sync leaves both blocks on block 2's."""
    killed: list[int] = []
    seen: dict[int, Any] = {}

    def kill_then_probe(run: Any, step: int, metrics: dict[str, float]) -> None:
        workers = run.strategy.workers
        if step == 3 and not killed:
            killed.append(step)
            ray.kill(workers[0])
        if step == 4:
            seen[step] = ray.get([w.embedding.remote() for w in workers])

    raw = noprop_config(tmp_path, dataset_root)
    raw["stop"] = {"max_steps": 4}
    result = unlocked.run(raw, callbacks=[on_step(kill_then_probe)])
    assert killed and result.failures == 1 and result.step == 4
    first, last = seen[4]
    assert torch.equal(first, last)
