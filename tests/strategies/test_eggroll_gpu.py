"""EGGROLL on a GPU: members drawn on the CPU, scored and updated on the device.

Skipped without CUDA (the `gpu` marker); run with `pytest -m gpu` on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.config import OptimizerConfig
from strategies.eggroll.lowrank import NoiseSpec
from strategies.eggroll.tasks.configs import GymTaskConfig
from workers.population import ESReplica

pytestmark = pytest.mark.gpu


def replica(device: str) -> ESReplica:
    return ESReplica(
        task=GymTaskConfig(max_episode_steps=20, hidden=[32]),
        model=None,
        dataset=None,
        optimizer=OptimizerConfig(kind="adam", lr=0.05),
        spec=NoiseSpec(rank=2),
        shaping="centered_ranks",
        seed=5,
        device=device,
    )


def test_a_cuda_replica_scores_and_updates_like_the_cpu_reference():
    cpu, gpu = replica("cpu"), replica("cuda")
    assert all(p.is_cuda for p in gpu.params)
    for generation in range(3):
        a = cpu.fitness(generation, range(16), 0.1)
        b = gpu.fitness(generation, range(16), 0.1)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        cpu.update(generation, a, 0.1, 0.05)
        gpu.update(generation, a, 0.1, 0.05)
    for p, q in zip(cpu.params, gpu.params, strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)


def test_a_cuda_replica_saves_on_the_host_and_resyncs_from_the_cpu():
    gpu = replica("cuda")
    gpu.update(0, np.linspace(0, 1, 16), 0.1, 0.05)
    state = gpu.state()
    assert all(t.device.type == "cpu" for t in state["model"].values())
    cpu = replica("cpu")
    cpu.load(state)
    assert cpu.checksum() == gpu.checksum()
