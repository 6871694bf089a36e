"""Solver actors generating PDE instances into a real bounded buffer while a trainer draws."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from strategies.moe_hc.pde.configs import DiffusionSorptionConfig, OnlineDataConfig
from strategies.moe_hc.pde.online import OnlineInstances, regenerate
from strategies.moe_hc.pde.problems import build_problem, online_directory
from workers.pde_generator import GeneratorPool, PDEGeneratorWorker

pytestmark = pytest.mark.slow

ONLINE = OnlineDataConfig(generators=2, instances_per_shard=2, buffer_shards=6, warmup_shards=2)


def problem_config(root: Path) -> DiffusionSorptionConfig:
    # A small grid: about 10-30 ms a solve, so the solvers keep up with a 40 ms step.
    return DiffusionSorptionConfig(nx=16, nt=6, root=f"file://{root}", online=ONLINE)


def start_generators(config: DiffusionSorptionConfig, directory: str) -> list:
    actor = ray.remote(num_cpus=1)(PDEGeneratorWorker)
    generators = [actor.remote(config, directory, k, 1) for k in range(ONLINE.generators)]
    ray.get([g.pid.remote() for g in generators])
    return generators


def test_solver_actors_fill_a_bounded_buffer_while_training_never_waits(ray_local, tmp_path):
    config = problem_config(tmp_path)
    directory = online_directory(config, "run-0")
    generators = start_generators(config, directory)
    problem = build_problem(config)
    buffer = OnlineInstances(problem, ONLINE, 0, directory, GeneratorPool(generators), seed=0)
    folder = Path(directory.removeprefix("file://"))
    history = []
    for t in range(40):
        ids, features, solutions = buffer.next_batch(t, 3, torch.Generator().manual_seed(t))
        time.sleep(0.04)  # the training step
        history.append(buffer.stats())
        assert len(list(folder.glob("shard-*.parquet"))) <= 6 + 2 * ONLINE.generators
    waits = [m["system/online_waits"] for m in history]
    assert waits[0] >= 1 and sum(waits[1:]) == 0
    assert history[-1]["system/online_buffer_instances"] == 6 * 2
    assert history[-1]["system/online_shards_evicted"] > 0
    busy = [m[f"generator-{k}/system/busy_fraction"] for m in history for k in range(2)]
    assert all(0.0 <= b <= 1.0 for b in busy) and max(busy) > 0.0
    # The record of the run regenerates exactly what the last batch trained on.
    batches, seen = buffer.seen()
    np.testing.assert_array_equal(batches, np.arange(40))
    np.testing.assert_array_equal(seen[-1], ids)
    again_features, again_solutions = regenerate(problem, 0, ids)
    np.testing.assert_array_equal(features.numpy(), again_features)
    np.testing.assert_array_equal(solutions.numpy(), again_solutions)
    spans = ray.get([g.spans.remote() for g in generators])
    assert all(spans)  # both actors generated
    for g in generators:
        ray.kill(g)


def test_a_lost_solver_actor_fails_the_trainers_wait(ray_local, tmp_path):
    config = problem_config(tmp_path)
    directory = online_directory(config, "run-1")
    generators = start_generators(config, directory)
    pool = GeneratorPool(generators[:1])
    ray.kill(generators[0])
    pool.submit(0)
    with pytest.raises(ray.exceptions.RayActorError):
        pool.completed(timeout=None)
    ray.kill(generators[1])
