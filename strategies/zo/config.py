"""`strategy: {kind: zo}`: MeZO / zeroth-order SPSA's section."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from orchestrator.errors import ConfigError
from strategies.config import (
    MAX_LR,
    MAX_WEIGHT_DECAY,
    MLPConfig,
    ModelFamilyConfig,
    ResNetConfig,
    StrategyConfig,
    TransformerConfig,
    check_model_reads_data,
    supervised_eval_metrics,
)
from strategies.registry import register

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.data.source import DatasetInfo

MAX_EPS = 1.0
"""eps scales a unit Gaussian added to every weight: MeZO uses 1e-3 for full-parameter
fine-tuning and 1e-1 for prefixes; past 1 the two losses no longer see one neighbourhood."""

BATCH_NORM_REFUSAL = (
    "SPSA scores both perturbations in eval mode, where batch norm only reads running "
    "statistics that no forward pass would ever update"
)


@register("strategies.zo.driver:ZOStrategy")
class ZOConfig(StrategyConfig):
    """MeZO: the gradient estimated from two forward passes along one seeded direction;
    memory of inference, only seeds and loss scalars travel."""

    kind: Literal["zo"] = Field(default="zo", description="This strategy.")
    lr: float = Field(
        default=0.01,
        gt=0,
        le=MAX_LR,
        description="SGD step on the SPSA estimate (constant, as MeZO). MeZO's 1e-6..1e-7 "
        "fine-tune pretrained language models; from scratch needs far larger (0.01 trains "
        "the digits MLP of examples/zo-classification.yaml; its loss rose at 0.05).",
    )
    eps: float = Field(
        default=1e-3,
        gt=0,
        le=MAX_EPS,
        description="Perturbation scale of the central difference (MeZO: 1e-3).",
    )
    weight_decay: float = Field(
        default=0.0,
        ge=0,
        le=MAX_WEIGHT_DECAY,
        description="L2 pull on the weights; not on biases and norm layers (as MeZO).",
    )
    directions: int = Field(
        default=1,
        ge=1,
        description="Seeded directions averaged per update (n-SPSA); each costs 2 forwards.",
    )
    batches_per_step: int = Field(
        default=20, gt=0, description="SPSA updates per step, one train batch each."
    )
    in_place: bool = Field(
        default=False,
        description="MeZO's perturb-score-restore on the live weights (no parameter copy, "
        "for large models; the round trip rounds, replicas are checksummed); false: score "
        "a perturbed copy (exact, one extra copy of the parameters).",
    )
    workers: int = Field(
        default=2,
        ge=1,
        description="Data-parallel workers; each scores its slice of every batch along the "
        "same directions.",
    )
    checksum_every: int = Field(
        default=10, ge=1, description="Steps between checks that the replicas agree."
    )

    def num_workers(self) -> int:
        return self.workers

    def hyperparameter_names(self) -> list[str]:
        return ["lr", "eps"]

    def eval_metrics(self, run: RunConfig) -> tuple[str, ...]:
        return supervised_eval_metrics(run)

    def check_against(self, run: RunConfig) -> None:
        check_model_reads_data(run)
        refusal = model_refusal(run.model)
        if refusal is not None:
            raise ConfigError(refusal)
        if run.data is not None and run.data.batch_size < self.workers:
            raise ConfigError(
                f"strategy.workers: {self.workers} workers share batches of "
                f"data.batch_size {run.data.batch_size} rows; allowed: 1..{run.data.batch_size} "
                "(or raise data.batch_size)"
            )

    def check_with_data(self, run: RunConfig, dataset: DatasetInfo) -> None:
        """Build the network as every worker will: a custom one must chain its units and
        hold no batch norm."""
        from torch import nn

        from strategies.models.network import build_network
        from strategies.models.units import profile_network

        network = build_network(run.model, dataset.input, 0)
        profile_network(network, dataset.input)
        norms = [
            name
            for name, module in network.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]
        if norms:
            raise ConfigError(
                f"model: the network has batch norm layers ({', '.join(norms[:3])}), which "
                f"strategy.kind zo cannot train: {BATCH_NORM_REFUSAL}; use nn.GroupNorm, "
                "nn.LayerNorm or no norm"
            )


def model_refusal(model: ModelFamilyConfig) -> str | None:
    """Why zo cannot train ``model``, known from its section alone, or None."""
    if isinstance(model, ResNetConfig):
        return (
            "model.kind: 'resnet' cannot be trained by strategy.kind zo: its blocks use batch "
            f"norm, and {BATCH_NORM_REFUSAL}; train the resnet with strategy.kind backprop or "
            "pipeline, or give zo model.kind: custom, a conv net with nn.GroupNorm or no norm"
        )
    if isinstance(model, MLPConfig) and model.norm == "batchnorm":
        return (
            f"model.norm: 'batchnorm' is not allowed with strategy.kind zo: "
            f"{BATCH_NORM_REFUSAL}; use 'layernorm' or 'none'"
        )
    if isinstance(model, (MLPConfig, TransformerConfig)) and model.dropout > 0:
        return (
            f"model.dropout: {model.dropout} is not allowed with strategy.kind zo, which "
            "scores both perturbations in eval mode (dropout off, as MeZO); set it to 0"
        )
    return None
