"""ExpertWorker: one subdomain's hard constraint, solved and differentiated locally.

A thin shell around ``strategies.moe_hc.training``: ``solve`` receives the basis fields on
its constraint points and returns ω*; ``vjp`` receives dL/dω* and returns dL/dΦ by one
adjoint solve. The task is kept between the two calls (actor calls run in order), so the
basis evaluations cross the object store once per step.
"""

from __future__ import annotations

import os

import torch

from strategies.moe_hc.hard_constraint import SolverOptions
from strategies.moe_hc.pde.configs import ProblemConfig
from strategies.moe_hc.pde.problems import build_problem
from strategies.moe_hc.training import ExpertSolution, ExpertTask, solve_task, task_vjp
from workers.telemetry import BusyTimeline, StepMemory


class ExpertWorker:
    def __init__(
        self, problem: ProblemConfig, options: SolverOptions, threads: int, device: str = "cpu"
    ) -> None:
        torch.set_num_threads(threads)
        self.problem = build_problem(problem)
        self.options, self.device = options, device
        self.task: ExpertTask | None = None
        self.omega: torch.Tensor | None = None
        self.timeline = BusyTimeline()
        self.memory = StepMemory(device)

    def pid(self) -> int:
        return os.getpid()

    def solve(self, task: ExpertTask) -> ExpertSolution:
        with self.timeline.busy(), self.memory.inference():
            self.task = ExpertTask(
                {k: v.to(self.device) for k, v in task.basis.items()},
                {k: v.to(self.device) for k, v in task.values.items()},
            )
            solution = solve_task(self.problem, self.task, self.options)
            self.omega = solution.omega
            solution.omega = solution.omega.cpu()
            return solution

    def vjp(self, cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.task is not None and self.omega is not None, "vjp before solve"
        with self.timeline.busy():
            with self.memory.inference():
                grads = task_vjp(
                    self.problem, self.task, self.omega, cotangent.to(self.device), self.options
                )
            self.memory.finish(held=[*self.task.basis.values(), *self.task.values.values()])
            self.task = self.omega = None
            return {k: v.cpu() for k, v in grads.items()}

    def spans(self) -> list[tuple[float, float]]:
        return list(self.timeline.spans)

    def peak_training_bytes(self) -> int | None:
        return self.memory.peak
