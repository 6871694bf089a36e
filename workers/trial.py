"""TrialRunner: one PBT slot, hosting an inner strategy and driving it interval by interval.

A runner is to its inner strategy what the controller is to a plain run, and builds it the
same way (``orchestrator.recovery.build_strategy``: the inner strategy spawns its own
workers in the slot's share of the placement group), then calls ``step`` and ``evaluate``.
A lost runner or worker is rebuilt by PBT's driver, charged to the run's failure budget.
Between intervals the runner may be handed another trial's state, which is how both
exploit (a copy of a better trial) and time-slicing (more trials than slots) work: the
state arrives as a Ray object reference, resolved from the object store straight into
this actor, never through the driver or a disk.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.recovery import build_strategy

if TYPE_CHECKING:
    from orchestrator.context import RunContext


class TrialRunner:
    def __init__(self, ctx: RunContext) -> None:
        torch.set_num_threads(1)  # the runner schedules; its workers compute
        self.strategy = build_strategy(ctx.config, ctx)

    def state(self) -> dict[str, Any]:
        return self.strategy.state()

    def run(
        self,
        state: dict[str, Any] | None,
        hyperparameters: dict[str, Any] | None,
        steps: int,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load ``state`` (None: keep the live one), set ``hyperparameters`` (None: keep
        those the state carries, so a strategy's own schedule, e.g. EGGROLL's decaying
        sigma, runs on), train ``steps`` steps, evaluate; return (report, the new state).
        Call with ``num_returns=2`` so the state stays in the object store until a trial
        or a checkpoint asks for it."""
        start = time.time()
        if state is not None:
            self.strategy.restore(state)
        if hyperparameters is not None:
            self.strategy.set_hyperparameters(hyperparameters)
        loaded = time.time()
        metrics: dict[str, float] = {}
        for _ in range(steps):
            metrics = self.strategy.step()
        metrics.update(self.strategy.evaluate())
        trained = time.time()
        new_state = self.strategy.state()
        end = time.time()
        report = {
            "metrics": metrics,
            "peak_training_bytes": self.strategy.peak_training_bytes(),
            "load_s": loaded - start,
            "capture_s": end - trained,
            "span": (start, end),
        }
        return report, new_state

    def export(self, state: dict[str, Any]) -> torch.nn.Module:
        self.strategy.restore(state)
        return self.strategy.export_model()

    def ready(self) -> bool:
        """Answers once the runner and its inner strategy's workers are up."""
        return True
