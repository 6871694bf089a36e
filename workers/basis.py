"""BasisWorker: the basis network of PI-HC-MoE, its optimizer and its instances.

A thin shell around ``strategies.moe_hc.training.BasisTrainer``. Its calls are the
network's phases of a step (prepare, combine, apply); between them the experts solve.
Ray hands a method with ``num_returns=K`` one object per expert, so each expert's task
and cotangent travel straight to that expert through the object store. Online
(``problem.online``), it also holds the buffer that the solver actors ``generators`` fill:
it draws each batch from it in ``prepare``, where a lost solver's error surfaces.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from strategies.moe_hc.training import BasisTrainer, ExpertSolution
from strategies.optim import set_learning_rate
from workers.host import on_host
from workers.pde_generator import GeneratorPool
from workers.telemetry import BusyTimeline, StepMemory


def _one_per_expert(items: list[Any]) -> Any:
    """What a ``num_returns=K`` method returns: the item itself when K is 1."""
    return items[0] if len(items) == 1 else tuple(items)


class BasisWorker:
    def __init__(self, threads: int, generators: list[Any] | None = None, **trainer: Any) -> None:
        torch.set_num_threads(threads)
        source = GeneratorPool(generators) if generators else None
        self.trainer = BasisTrainer(**trainer, source=source)
        self.timeline = BusyTimeline()
        self.memory = StepMemory(trainer.get("device", "cpu"))

    def pid(self) -> int:
        return os.getpid()

    def prepare(self, t: int) -> Any:
        with self.timeline.busy(), self.memory.backprop():
            return _one_per_expert(self.trainer.prepare(t))

    def combine(self, *solutions: ExpertSolution) -> tuple[Any, ...]:
        with self.timeline.busy(), self.memory.backprop():
            metrics, cotangents = self.trainer.combine(list(solutions))
            return (metrics, *cotangents)

    def apply(self, *grads: dict[str, torch.Tensor]) -> float:
        with self.timeline.busy():
            with self.memory.backprop():
                norm = self.trainer.apply(list(grads))
            self._finish_step()
            return norm

    def soft_step(self, t: int) -> dict[str, float]:
        with self.timeline.busy():
            with self.memory.backprop():
                metrics = self.trainer.soft_step(t)
            self._finish_step()
            return metrics

    def _finish_step(self) -> None:
        self.memory.finish(self.trainer.parameters, self.trainer.optimizer)

    def evaluation_tasks(self) -> Any:
        return _one_per_expert(self.trainer.evaluation_tasks())

    def evaluate(self, *solutions: ExpertSolution) -> dict[str, float]:
        omegas = [s.omega for s in solutions] if solutions else None
        return self.trainer.evaluate(omegas)

    def field_sample(self) -> dict[str, Any]:
        return self.trainer.field_sample()

    def online_stats(self) -> dict[str, float]:
        return self.trainer.online_stats()

    def seen_instances(self) -> str:
        return self.trainer.seen_instances()

    def state(self) -> dict[str, Any]:
        return on_host(self.trainer.state())

    def load(self, state: dict[str, Any]) -> None:
        self.trainer.load(state)

    def set_lr(self, lr: float) -> None:
        set_learning_rate(self.trainer.optimizer, lr)

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.trainer.network.state_dict().items()}

    def spans(self) -> list[tuple[float, float]]:
        return list(self.timeline.spans)

    def peak_training_bytes(self) -> int | None:
        return self.memory.peak
