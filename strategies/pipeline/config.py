"""`strategy: {kind: pipeline}`: the update-unlocked pipeline's section."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.errors import ConfigError
from strategies.config import (
    LearningRate,
    MLPConfig,
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
LocalRule = Literal["cross_entropy", "mono_forward", "forward_forward"]


class MomentumAuxConfig(BaseModel):
    """MAN (Su et al., ECCV 2024): each non-final block's head first runs a moving average
    of the next block's first unit, plus a learnable unit like it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    momentum: float = Field(
        default=0.995,
        gt=0,
        lt=1,
        description="Per-batch EMA momentum (0.995: the official code's README commands for "
        "CIFAR-10 and ImageNet). The average follows once per step, by momentum ** "
        "(batches in the step), so its half-life in batches is MAN's.",
    )


class ForwardForwardConfig(BaseModel):
    """Forward-Forward (Hinton, 2022): every layer pushes the goodness (sum of squared
    activities) of positive data above a threshold and of negative data below it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    threshold: float | None = Field(
        default=None,
        gt=0,
        description="Goodness threshold; default: the layer's width, as Hinton's code sets "
        "it (the sum of squares of activities normalised to RMS 1 then sits at it).",
    )
    label_input: Literal["concat", "overwrite"] = Field(
        default="concat",
        description="How the label enters: `overwrite` writes the one-hot label over the "
        "first C features (the paper, on MNIST's blank border); `concat` appends it, for "
        "data with no blank features to spare.",
    )
    skip_first: bool = Field(
        default=True,
        description="Prediction sums the goodness of every layer but the first (Hinton's code) "
        "when there is more than one.",
    )


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
    local_rule: LocalRule = Field(
        default="cross_entropy",
        description="What each block learns from: `cross_entropy` of its aux_head; "
        "`mono_forward`: a bias-free projection to the classes per block (Mono-Forward; "
        "aux_head and aux_depth unused); `forward_forward`: goodness of positive vs "
        "negative data, no heads (one MLP layer per block, see `forward_forward`).",
    )
    momentum_aux: MomentumAuxConfig | None = Field(
        default=None,
        description="MAN: put a moving average of the next block's first unit (and a learnable "
        "copy) before each non-final block's head; cross_entropy only.",
    )
    forward_forward: ForwardForwardConfig | None = Field(
        default=None,
        description="Options of local_rule: forward_forward (default: its defaults).",
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

    @model_validator(mode="after")
    def _rule_options_fit(self) -> PipelineConfig:
        if self.momentum_aux is not None:
            if self.local_rule != "cross_entropy":
                raise ValueError(
                    f"momentum_aux puts MAN before a cross-entropy head; local_rule "
                    f"{self.local_rule!r} has none: remove momentum_aux or set local_rule: "
                    "cross_entropy"
                )
            if self.blocks < 2:
                raise ValueError(
                    "momentum_aux follows the next block's first unit, and 1 block has no "
                    "next block: set blocks >= 2 or remove momentum_aux"
                )
        if self.local_rule != "forward_forward" and self.forward_forward is not None:
            raise ValueError(
                "forward_forward options apply to local_rule: forward_forward; remove them "
                "or set that rule"
            )
        return self

    def forward_forward_options(self) -> ForwardForwardConfig | None:
        """Forward-Forward's options where it is the rule (its defaults unless given)."""
        if self.local_rule != "forward_forward":
            return None
        return self.forward_forward or ForwardForwardConfig()

    def head_kind(self) -> Literal["linear", "augmented", "projection"]:
        """The local head of every non-final block, as ``plan_blocks`` names it."""
        if self.local_rule == "forward_forward":
            return "linear"  # no head is built: the cut alone matters
        return "projection" if self.local_rule == "mono_forward" else self.aux_head

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
        if self.local_rule == "forward_forward":
            self._check_forward_forward(run)
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

    def _check_forward_forward(self, run: RunConfig) -> None:
        """Forward-Forward as the paper runs it: an MLP of plain ReLU-style layers, one
        layer per block (each layer has its own goodness), no normalisation inside a layer
        (it would fix the activity's length, which is the goodness) and no dropout."""
        model = run.model
        if not isinstance(model, MLPConfig):
            raise ConfigError(
                f"strategy.local_rule: forward_forward trains MLP layers; model.kind is "
                f"{model.kind!r}: use model.kind: mlp (or another local_rule)"
            )
        if model.norm != "none":
            raise ConfigError(
                f"model.norm: {model.norm!r} rescales each layer's activities, whose squared "
                "length is Forward-Forward's goodness; set model.norm: none"
            )
        threshold = (self.forward_forward or ForwardForwardConfig()).threshold
        if model.activation == "tanh" and (threshold is None or threshold >= min(model.hidden)):
            raise ConfigError(
                "model.activation: 'tanh' bounds each layer's goodness (sum of squared "
                "activities) by its width, and the threshold positives must clear is "
                f"{'the width' if threshold is None else threshold}; use relu (Hinton's code) "
                f"or set strategy.forward_forward.threshold below {min(model.hidden)}"
            )
        if model.dropout:
            raise ConfigError(
                f"model.dropout: {model.dropout} would make positive and negative passes "
                "differ by chance; set model.dropout: 0 for local_rule: forward_forward"
            )
        if self.blocks != len(model.hidden):
            raise ConfigError(
                f"strategy.blocks: {self.blocks}, but Forward-Forward gives every layer its "
                f"own goodness and model.hidden has {len(model.hidden)} layers; set blocks: "
                f"{len(model.hidden)}"
            )

    def check_with_data(self, run: RunConfig, dataset: DatasetInfo) -> None:
        """Cut the network as the driver will: a custom network's units must chain, and
        fill the blocks."""
        from strategies.pipeline.local_learning import plan_blocks

        plan_blocks(
            run.model,
            dataset.input,
            self.blocks,
            self.head_kind(),
            self.aux_depth,
            momentum=self.momentum_aux is not None,
        )

    def num_workers(self) -> int:
        return self.blocks

    def eval_metrics(self, run: RunConfig) -> tuple[str, ...]:
        return supervised_eval_metrics(run)

    def hyperparameter_names(self) -> list[str]:
        return [f"lr/block-{k}" for k in range(self.blocks)]
