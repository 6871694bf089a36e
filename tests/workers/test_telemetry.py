"""Peak training memory, measured one way for every worker (no Ray: workers are plain classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from strategies.config import OptimizerConfig
from strategies.eggroll.lowrank import NoiseSpec
from strategies.eggroll.tasks.configs import GymTaskConfig
from strategies.moe_hc.hard_constraint import SolverOptions
from strategies.moe_hc.mixture import Decomposition
from strategies.moe_hc.pde.problems import HeatConfig
from strategies.moe_hc.training import Sampling
from workers.basis import BasisWorker
from workers.expert import ExpertWorker
from workers.population import PopulationWorker
from workers.telemetry import StepMemory, model_state_bytes

FLOAT = 4  # bytes


def test_a_backprop_part_counts_held_state_and_what_autograd_saves():
    weight = torch.nn.Parameter(torch.zeros(100))
    optimizer = torch.optim.SGD([weight], lr=0.1)  # plain SGD keeps no state
    memory = StepMemory("cpu")
    with memory.backprop():
        loss = weight.exp().sum()  # exp saves its result for backward; sum saves nothing
        loss.backward()
        optimizer.step()
    memory.finish([weight], optimizer)
    assert memory.peak == 2 * 100 * FLOAT + 100 * FLOAT  # weight and its gradient, exp(w)


def test_an_inference_part_counts_the_peak_of_live_allocations_only():
    existing = torch.ones(1000)
    memory = StepMemory("cpu")
    with memory.inference():
        a, b = torch.ones(256), torch.ones(512)  # 3072 bytes at once
        del a, b
        existing.add_(1.0)  # in place: nothing new
        view = existing[:10]  # a view of a tensor from before: nothing new
        doubled = existing * 2  # 4000 bytes, the peak
    memory.finish()
    assert memory.peak == 1000 * FLOAT
    assert view.shape == (10,) and doubled.shape == (1000,)


def test_a_tensor_kept_between_parts_counts_in_the_later_one():
    memory = StepMemory("cpu")
    with memory.inference():
        kept = torch.ones(256)
    with memory.inference():
        torch.ones(512)
    memory.finish(held=[torch.ones(64)])
    assert memory.peak == (256 + 512 + 64) * FLOAT
    assert kept.numel() == 256


def test_only_the_first_step_is_measured():
    memory = StepMemory("cpu")
    with memory.inference():
        torch.ones(16)
    memory.finish()
    with memory.inference():
        torch.ones(10_000)
    memory.finish(held=[torch.ones(10_000)])
    assert memory.peak == 16 * FLOAT and not memory.measuring


def _population_worker(spec: NoiseSpec) -> PopulationWorker:
    return PopulationWorker(
        threads=1,
        task=GymTaskConfig(hidden=[64, 64], max_episode_steps=5),
        model=None,
        dataset=None,
        optimizer=OptimizerConfig(kind="adam", lr=0.05),
        spec=spec,
        shaping="centered_ranks",
        seed=0,
    )


def _one_generation(worker: PopulationWorker, population: int) -> int:
    fitness = worker.fitness(0, 0, population, 0.1)
    assert worker.peak_training_bytes() is None  # a generation ends with its update
    worker.update(0, np.asarray(fitness), 0.1, 0.05)
    peak = worker.peak_training_bytes()
    assert peak is not None
    return peak


def test_an_eggroll_generation_holds_its_state_and_its_low_rank_noise():
    population = 32
    low = _population_worker(NoiseSpec(rank=1))
    full = _population_worker(NoiseSpec(full_rank=True))
    state = model_state_bytes(low.replica.params, low.replica.optimizer)
    low_peak, full_peak = _one_generation(low, population), _one_generation(full, population)
    assert low_peak > state
    # Dense perturbations of the 64 x 64 matrix alone: one per member pair.
    assert full_peak - low_peak > population // 2 * 64 * 64 * FLOAT


@pytest.fixture
def heat_trainer(tmp_path: Path) -> dict:
    return dict(
        problem=HeatConfig(root=str(tmp_path), train_instances=8, test_instances=2, nx=16, nt=9),
        network={"num_basis": 8, "width": 16, "depth": 2},
        optimizer=OptimizerConfig(lr=1e-2),
        decomposition=Decomposition((0.0, 0.0), (1.0, 1.0), (2, 1), 0.1),
        sampling=Sampling(instances=2, interior=64, boundary=8, data=32, residual=32),
        constraint="hard",
        continuity_weight=1.0,
        soft_weight=1.0,
        seed=0,
    )


def test_the_basis_and_its_experts_measure_one_whole_step(heat_trainer):
    options = SolverOptions()
    basis = BasisWorker(threads=1, **heat_trainer)
    experts = [ExpertWorker(heat_trainer["problem"], options, threads=1) for _ in range(2)]
    tasks = basis.prepare(0)
    task_bytes = sum(v.numel() * v.element_size() for v in tasks[0].basis.values())
    solutions = [e.solve(t) for e, t in zip(experts, tasks)]
    _, *cotangents = basis.combine(*solutions)
    assert basis.peak_training_bytes() is None  # the step is not over before apply
    grads = [e.vjp(c) for e, c in zip(experts, cotangents)]
    basis.apply(*grads)
    trainer = basis.trainer
    state = model_state_bytes(trainer.parameters, trainer.optimizer)
    assert basis.peak_training_bytes() > state  # plus the activations saved for apply
    expert_peak = experts[0].peak_training_bytes()
    assert expert_peak is not None and expert_peak > task_bytes  # plus the solve's work
