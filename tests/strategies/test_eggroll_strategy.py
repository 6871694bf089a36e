"""EGGROLL end to end on a local Ray: solving CartPole, recovery, resync, traffic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

import unlocked
from orchestrator.config import validate_mapping
from strategies.config import OptimizerConfig
from strategies.eggroll.lowrank import NoiseSpec
from strategies.eggroll.tasks.configs import GymTaskConfig
from strategies.replicas import shards
from tests.conftest import on_step
from workers.population import ESReplica


def es_config(tmp_path: Path, **strategy: Any) -> dict[str, Any]:
    return {
        "run": {"name": "es-test", "seed": 0},
        "strategy": {
            "kind": "eggroll",
            "population": 64,
            "rank": 1,
            "sigma": 0.1,
            "optimizer": {"kind": "adam", "lr": 0.05},
            "workers": 2,
            "checksum_every": 2,
            "task": {
                "kind": "gym",
                "env": "CartPole-v1",
                "hidden": [16],
                "max_episode_steps": 100,
                "eval_episodes": 5,
            },
            **strategy,
        },
        "tracking": {"enabled": False},
        "checkpoint": {"root": str(tmp_path / "ckpt"), "every": 2},
        "stop": {"max_steps": 6},
        "eval": {"every": 3},
    }


def test_shards_cover_the_population_once():
    assert shards(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shards(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_replicas_given_the_same_fitness_stay_bit_identical():
    args = dict(
        task=GymTaskConfig(max_episode_steps=20),
        model=None,
        dataset=None,
        optimizer=OptimizerConfig(kind="adam", lr=0.05),
        spec=NoiseSpec(rank=2),
        shaping="centered_ranks",
        seed=3,
    )
    a, b = ESReplica(**args), ESReplica(**args)
    for generation in range(3):
        fitness = np.concatenate(
            [a.fitness(generation, range(0, 5), 0.1), b.fitness(generation, range(5, 8), 0.1)]
        )
        a.update(generation, fitness, 0.1, 0.05)
        b.update(generation, fitness, 0.1, 0.05)
    assert a.checksum() == b.checksum()


def test_odd_population_with_mirrored_sampling_is_a_config_error(tmp_path):
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.population: 63 is odd"):
        validate_mapping(es_config(tmp_path, population=63))


@pytest.mark.slow
def test_cartpole_is_solved_by_two_workers(ray_local, tmp_path):
    raw = es_config(tmp_path, population=128, checksum_every=10)
    raw["strategy"]["task"] = {
        "kind": "gym",
        "env": "CartPole-v1",
        "hidden": [16],
        "eval_episodes": 20,
    }
    raw["stop"] = {"max_steps": 60, "target": {"metric": "eval/return", "value": 475}}
    raw["eval"] = {"every": 5}
    result = unlocked.run(raw)
    assert result.metrics["eval/return"] >= 475, result.metrics
    assert result.stopped_by == "target"


@pytest.mark.slow
def test_a_killed_worker_is_rebuilt_and_replicas_agree(ray_local, tmp_path):
    killed, final = [], {}

    def kill_then_check(run, step: int, metrics: dict) -> None:
        strategy = run.strategy
        if step == 3 and not killed:
            killed.append(True)
            ray.kill(strategy.workers[1])
        if step == 6:
            final["reference"] = strategy.reference.checksum()
            final["workers"] = ray.get([w.checksum.remote() for w in strategy.workers])

    result = unlocked.run(es_config(tmp_path), callbacks=[on_step(kill_then_check)])
    assert killed and result.failures == 1 and result.step == 6
    assert final["workers"] == [final["reference"]] * 2


@pytest.mark.slow
def test_a_drifted_worker_is_resynced(ray_local, tmp_path):
    seen = {}

    def corrupt(run, step: int, metrics: dict) -> None:
        strategy = run.strategy
        if step == 1:
            state = strategy.reference.state()
            first = next(iter(state["model"]))
            state["model"][first] = state["model"][first] + 1e-3
            ray.get(strategy.workers[0].load.remote(state))
        if step == 2:
            seen["resynced"] = metrics["system/resynced_workers"]
            sums = ray.get([w.checksum.remote() for w in strategy.workers])
            seen["agree"] = sums == [strategy.reference.checksum()] * 2

    unlocked.run(es_config(tmp_path), callbacks=[on_step(corrupt)])
    assert seen == {"resynced": 1.0, "agree": True}


@pytest.mark.slow
def test_bytes_per_generation_do_not_grow_with_the_parameter_count(ray_local, tmp_path):
    traffic = {}
    for hidden in ([4], [512, 512]):
        raw = es_config(tmp_path / str(hidden[0]), population=16, checksum_every=100)
        raw["strategy"]["task"]["hidden"] = hidden
        raw["strategy"]["task"]["max_episode_steps"] = 10
        raw["stop"] = {"max_steps": 2}
        result = unlocked.run(raw)
        traffic[hidden[0]] = [m["system/bytes_per_generation"] for _, m in result.history]
    assert traffic[4] == traffic[512]
    assert max(traffic[4]) < 4096


@pytest.mark.slow
def test_a_transformer_language_model_learns_grammar_with_no_gradient(
    ray_local, tmp_path, dataset_root
):
    raw = es_config(tmp_path, population=32, sigma=0.02, checksum_every=5)
    raw["strategy"]["optimizer"] = {"kind": "adam", "lr": 0.03}
    raw["strategy"]["task"] = {"kind": "lm", "batch_size": 8, "eval_batches": 2}
    raw["model"] = {"kind": "transformer", "d_model": 32, "layers": 1, "heads": 2}
    data = {"dataset": "grammar", "size": 20_000, "text": {"context": 32}}
    raw["data"] = {**data, "root": str(dataset_root)}
    raw["stop"] = {"max_steps": 10}
    raw["eval"] = {"every": 5}
    result = unlocked.run(raw)
    bits = [m["eval/bits_per_token"] for _, m in result.history if "eval/bits_per_token" in m]
    assert len(bits) == 2 and all(np.isfinite(bits))
    assert bits[1] < bits[0] < 8.0, bits  # 8 bits: uniform over the 256 byte values
    assert result.metrics["system/resynced_workers"] == 0.0
