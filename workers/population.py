"""PopulationWorker: one replica of the parameters, evaluating a shard of the population.

Thin shell around ``strategies.eggroll`` and ``strategies.eggroll.tasks``: it regenerates its
members' noise from their keys, returns one fitness per member, and applies the same
update as every other replica from (generation, all fitnesses). No weights cross the
network except when the controller resyncs a replica that drifted.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from orchestrator.data.source import DatasetInfo
from strategies.config import ModelConfig, OptimizerConfig
from strategies.eggroll.config import Shaping
from strategies.eggroll.lowrank import (
    ESUpdater,
    NoiseSpec,
    es_parameters,
    member_noise,
    noise_table,
    population,
)
from strategies.eggroll.tasks.base import build_task
from strategies.eggroll.tasks.configs import TaskConfig
from strategies.optim import build_optimizer
from strategies.replicas import parameter_checksum
from workers.host import on_host
from workers.telemetry import BusyTimeline, StepMemory


class ESReplica:
    """Model, task and updater: what the controller and each worker hold identically."""

    def __init__(
        self,
        task: TaskConfig,
        model: ModelConfig | None,
        dataset: DatasetInfo | None,
        optimizer: OptimizerConfig,
        spec: NoiseSpec,
        shaping: Shaping,
        seed: int,
        device: str = "cpu",
    ) -> None:
        self.task = build_task(task, model, dataset)
        # Built on the CPU from the seed, then moved: every replica starts from the same
        # bytes whatever its device. Noise is drawn on the CPU too (``member_noise``), so a
        # member's perturbation is the same number everywhere, then moved to the weights.
        self.model = self.task.build_model(seed).to(device)
        self.params = es_parameters(self.model)
        self.optimizer = build_optimizer(self.params, optimizer)
        self.updater = ESUpdater(self.params, self.optimizer, spec, shaping, seed)
        self.spec, self.seed = spec, seed
        # The shared noise table (64 MiB, ~0.1 s) is built here, once per process, so the
        # first generation's time and inference memory don't carry it.
        noise_table()

    def fitness(self, generation: int, members: range, sigma: float) -> np.ndarray:
        noise = member_noise(self.params, members, self.seed, generation, sigma, self.spec)
        with torch.no_grad(), population(self.model, noise):
            values = self.task.fitness(self.model, len(members), generation, self.seed)
        return values.to(torch.float64).numpy()

    def update(self, generation: int, fitness: np.ndarray, sigma: float, lr: float) -> float:
        # Arrays from the object store are read-only views: the updater gets its own copy.
        return self.updater.apply(torch.tensor(fitness), generation, sigma, lr)

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            return self.task.evaluate(self.model, self.seed)

    def checksum(self) -> str:
        return parameter_checksum(self.params)

    def state(self) -> dict:
        """On the CPU, so a checkpoint or a resync loads wherever the reader runs."""
        return on_host({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class PopulationWorker:
    def __init__(self, threads: int, device: str = "cpu", **replica: Any) -> None:
        torch.set_num_threads(threads)
        self.replica = ESReplica(**replica, device=device)
        self.timeline = BusyTimeline()
        self.memory = StepMemory(device)

    def pid(self) -> int:
        return os.getpid()

    def fitness(self, generation: int, first: int, last: int, sigma: float) -> np.ndarray:
        """Fitness of members ``first .. last - 1`` in this generation."""
        with self.timeline.busy(), self.memory.inference():
            return self.replica.fitness(generation, range(first, last), sigma)

    def spans(self) -> list[tuple[float, float]]:
        return list(self.timeline.spans)

    def update(self, generation: int, fitness: np.ndarray, sigma: float, lr: float) -> None:
        self.replica.update(generation, fitness, sigma, lr)
        self.memory.finish(self.replica.params, self.replica.optimizer)

    def evaluate(self) -> dict[str, float]:
        return self.replica.evaluate()

    def checksum(self) -> str:
        return self.replica.checksum()

    def load(self, state: dict) -> None:
        self.replica.load(state)

    def peak_training_bytes(self) -> int | None:
        return self.memory.peak
