"""MoE-HC on online instances: the trainer in process, then a run whose solver actor is lost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

import unlocked
from orchestrator.config import validate_mapping
from orchestrator.errors import ConfigError
from strategies.config import OptimizerConfig
from strategies.moe_hc.hard_constraint import SolverOptions
from strategies.moe_hc.mixture import Decomposition
from strategies.moe_hc.pde.configs import HeatConfig, OnlineDataConfig
from strategies.moe_hc.pde.online import GeneratedShard, generate_shard, regenerate
from strategies.moe_hc.pde.problems import build_problem
from strategies.moe_hc.training import BasisTrainer, Sampling
from tests.conftest import on_step
from tests.strategies.test_moe_hc_strategy import moe_config

ONLINE = {"generators": 1, "instances_per_shard": 2, "buffer_shards": 64, "warmup_shards": 1}


def online_heat(root: Path) -> HeatConfig:
    return HeatConfig(
        root=str(root), test_instances=4, nx=24, nt=9, online=OnlineDataConfig(**ONLINE)
    )


class SolveNow:
    """A ``ShardSource`` that solves each requested shard at once, in this process."""

    capacity = 2

    def __init__(self, problem: HeatConfig, directory: Path) -> None:
        self.problem, self.directory = problem, str(directory)
        self.done: list[GeneratedShard] = []

    def submit(self, shard: int) -> None:
        per_shard = ONLINE["instances_per_shard"]
        pde = build_problem(self.problem)
        generate_shard(pde, self.problem.data_seed, self.directory, shard, per_shard)
        self.done.append(GeneratedShard(shard, 0, busy_s=1.0, alive_s=2.0))

    def completed(self, timeout: float | None) -> list[GeneratedShard]:
        done, self.done = self.done, []
        return done


def online_trainer(tmp_path: Path) -> BasisTrainer:
    problem, buffer = online_heat(tmp_path), tmp_path / "buffer"
    return BasisTrainer(
        problem=problem,
        network={"num_basis": 16, "width": 32, "depth": 2},
        optimizer=OptimizerConfig(lr=1e-2),
        decomposition=Decomposition((0.0, 0.0), (1.0, 1.0), (2, 1), 0.1),
        sampling=Sampling(instances=2, interior=128, boundary=16, data=64, residual=64),
        constraint="hard",
        continuity_weight=1.0,
        soft_weight=1.0,
        seed=0,
        outer_loss="data",
        source=SolveNow(problem, buffer),
        online_directory=str(buffer),
    )


def seen_rows(csv: str) -> dict[int, list[int]]:
    rows = [list(map(int, line.split(","))) for line in csv.strip().splitlines()[1:]]
    return {row[0]: row[1:] for row in rows}


def test_online_batches_come_from_the_buffer_and_resume_exactly(tmp_path):
    options = SolverOptions(max_iterations=20)
    a = online_trainer(tmp_path)
    for t in range(3):
        a.local_step(t, options)
    stats = a.online_stats()
    assert stats["system/online_waits"] == 1  # only the first batch waited
    assert stats["generator-0/system/busy_fraction"] == pytest.approx(0.5)
    seen = seen_rows(a.seen_instances())
    assert sorted(seen) == [0, 1, 2] and all(len(ids) == 2 for ids in seen.values())
    b = online_trainer(tmp_path)  # a fresh process: the buffer comes back from storage
    b.load(a.state())
    assert seen_rows(b.seen_instances()) == seen
    first, second = a.local_step(3, options), b.local_step(3, options)
    timings = {k for k in first if k.endswith("solve_s")}
    assert {k: v for k, v in first.items() if k not in timings} == {
        k: v for k, v in second.items() if k not in timings
    }
    assert seen_rows(a.seen_instances())[3] == seen_rows(b.seen_instances())[3]
    # A batch trains on its recorded ids' own instances: they regenerate from the record.
    a.prepare(4)
    features, _ = regenerate(a.problem, 0, np.array(seen_rows(a.seen_instances())[4]))
    np.testing.assert_array_equal(a.prepared.features.numpy(), features)


def test_online_config_counts_the_generators_and_checks_the_warm_buffer(tmp_path):
    raw = moe_config(tmp_path, instances_per_batch=2)
    raw["strategy"]["problem"]["online"] = ONLINE
    assert validate_mapping(raw).strategy.num_workers() == 1 + 2 + 1
    raw["strategy"]["instances_per_batch"] = 3
    with pytest.raises(ConfigError, match="instances_per_batch: 3 is more than the 2 instances"):
        validate_mapping(raw)


def dead_within(actor: Any, seconds: float) -> bool:
    """Whether Ray reports ``actor`` dead within ``seconds`` (``ray.kill`` is asynchronous)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=1)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_an_online_run_survives_a_lost_generator_and_resumes_its_record(ray_local, tmp_path):
    """Steps of 3 batches, checkpoints every 2 steps; the solver actor is killed after step
    3, so step 4's draw fails, the controller rebuilds every worker from checkpoint 2, and
    the restored buffer draws batch 6 as the interrupted run did."""
    records: dict[int, list[dict[int, list[int]]]] = {}
    killed: list[Any] = []

    def watch(run, step: int, metrics: dict) -> None:
        records.setdefault(step, []).append(
            seen_rows(ray.get(run.strategy.basis.seen_instances.remote()))
        )
        if step == 3 and not killed:
            generator = run.strategy.generators[0]
            ray.kill(generator, no_restart=True)
            killed.append(dead_within(generator, seconds=10))

    raw = moe_config(tmp_path, instances_per_batch=2, outer_loss="data")
    raw["strategy"]["problem"]["online"] = ONLINE
    raw["tracking"] = {"enabled": False}
    raw["stop"] = {"max_steps": 4}
    result = unlocked.run(raw, callbacks=[on_step(watch)])
    assert killed == [True] and result.failures == 1 and result.step == 4
    assert [s for s, _ in result.history] == [1, 2, 3, 4]  # 3 replayed from checkpoint 2

    last = result.history[-1][1]
    assert 0 < last["generator-0/system/busy_fraction"] <= 1
    assert last["system/online_waits"] == 0 and last["system/online_wait_s"] == 0
    assert result.history[0][1]["system/online_waits"] >= 1  # the first batch waited
    assert last["train/online_instances_seen"] > 2

    interrupted, resumed = records[3][0], records[4][-1]
    assert sorted(resumed) == list(range(12))
    assert {t: resumed[t] for t in range(6)} == {t: interrupted[t] for t in range(6)}
    assert resumed[6] == interrupted[6]  # drawn from the restored buffer as before
