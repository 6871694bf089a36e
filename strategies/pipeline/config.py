"""`strategy: {kind: pipeline}`: the update-unlocked pipeline's section."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from orchestrator.errors import ConfigError
from strategies.config import (
    LearningRate,
    OptimizerConfig,
    StrategyConfig,
    TransformerConfig,
    check_model_reads_data,
    supervised_eval_metrics,
)
from strategies.registry import register

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.data.source import DatasetInfo

TransportKind = Literal["object_store", "compiled_graph"]


@register("strategies.pipeline.driver:PipelineStrategy")
class PipelineConfig(StrategyConfig):
    """The update-unlocked pipeline: K blocks on K actors, each trained by its own local loss."""

    kind: Literal["pipeline"] = Field(default="pipeline", description="This strategy.")
    blocks: int = Field(default=3, ge=1, description="K: blocks, one actor each.")
    aux_head: Literal["linear", "augmented"] = Field(
        default="augmented", description="Local head of each non-final block."
    )
    aux_depth: int = Field(
        default=2, ge=1, description="AugLocal: aux-net depth of the first block, falling to 1."
    )
    batches_per_step: int = Field(
        default=20, gt=0, description="Batches through the pipe per step."
    )
    batches_per_call: int = Field(
        default=5,
        gt=0,
        description="Batches each actor call carries: a call's fixed cost is paid once for "
        "them all. At most batches_per_step / max_in_flight.",
    )
    max_in_flight: int = Field(default=4, ge=1, description="Calls in the pipe at once.")
    transport: TransportKind = Field(
        default="object_store",
        description="How activations go block to block: `object_store` chains actor calls "
        "through Ray's object store; `compiled_graph` compiles one Ray Compiled Graph over "
        "the blocks once (shared-memory channels on CPU, NCCL device to device between GPU "
        "workers) and saves each call's scheduling, but its waiting readers spin on a core "
        "each: use it where the cores (or GPUs) outnumber the blocks.",
    )
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="Each block's own, on its local loss."
    )
    block_lr: list[LearningRate] | None = Field(
        default=None, description="Learning rate per block (default: optimizer.lr for all)."
    )

    @model_validator(mode="after")
    def _lrs_match_blocks(self) -> PipelineConfig:
        if self.block_lr is not None and len(self.block_lr) != self.blocks:
            raise ValueError(
                f"block_lr has {len(self.block_lr)} values for {self.blocks} blocks; "
                "give one learning rate per block"
            )
        return self

    def call_size(self) -> int:
        """Batches per call, capped so that one step makes at least ``max_in_flight`` calls:
        a step then fills the pipe by itself and every step reports finished batches
        without draining it."""
        return max(1, min(self.batches_per_call, self.batches_per_step // self.max_in_flight))

    def gradient_batches_per_step(self) -> int:
        return self.batches_per_step

    def check_against(self, run: RunConfig) -> None:
        """Blocks the model's units can fill (a custom model's are counted when built), and
        no weight shared across workers."""
        check_model_reads_data(run)
        too_few = run.model.too_few_units(self.blocks)
        if too_few is not None:
            raise ConfigError(f"strategy.blocks: {too_few}")
        tied = isinstance(run.model, TransformerConfig) and run.model.tie_embeddings
        if tied and self.blocks > 1:
            raise ConfigError(
                f"model.tie_embeddings: with {self.blocks} blocks the token embedding (block 0) "
                f"and the output projection (block {self.blocks - 1}) live on different workers "
                "and cannot share a weight; set model.tie_embeddings: false (or blocks: 1)"
            )

    def check_with_data(self, run: RunConfig, dataset: DatasetInfo) -> None:
        """Cut the network as the driver will: a custom network's units must chain, and
        fill the blocks."""
        from strategies.pipeline.local_learning import plan_blocks

        plan_blocks(run.model, dataset.input, self.blocks, self.aux_head, self.aux_depth)

    def num_workers(self) -> int:
        return self.blocks

    def eval_metrics(self, run: RunConfig) -> tuple[str, ...]:
        return supervised_eval_metrics(run)

    def hyperparameter_names(self) -> list[str]:
        return [f"lr/block-{k}" for k in range(self.blocks)]
