"""`strategy: {kind: backprop}`: the end-to-end backprop baseline's section."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from strategies.config import (
    OptimizerConfig,
    StrategyConfig,
    check_model_reads_data,
    supervised_eval_metrics,
)
from strategies.registry import register

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.data.source import DatasetInfo


@register("strategies.backprop.driver:BackpropStrategy")
class BackpropConfig(StrategyConfig):
    """End-to-end backpropagation in one worker: the baseline for every comparison."""

    kind: Literal["backprop"] = Field(default="backprop", description="This strategy.")
    batches_per_step: int = Field(default=20, gt=0, description="Batches trained per step.")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="Updates the whole network."
    )

    def num_workers(self) -> int:
        return 1

    def gradient_batches_per_step(self) -> int:
        return self.batches_per_step

    def hyperparameter_names(self) -> list[str]:
        return ["lr"]

    def check_against(self, run: RunConfig) -> None:
        check_model_reads_data(run)

    def eval_metrics(self, run: RunConfig) -> tuple[str, ...]:
        return supervised_eval_metrics(run)

    def check_with_data(self, run: RunConfig, dataset: DatasetInfo) -> None:
        """Build the network and run its units once: a custom network's must chain."""
        from strategies.models.network import build_network
        from strategies.models.units import profile_network

        profile_network(build_network(run.model, dataset.input, 0), dataset.input)
