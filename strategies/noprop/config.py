"""`strategy: {kind: noprop}`: NoProp discrete time's section (arXiv:2503.24322).

Defaults marked [secondary] are the paper's DT hyperparameters as a course report restates
them (DanielHalachev/NoProp, "set according to the paper"); the paper's own tables could not
be read. The others are this project's choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from orchestrator.errors import ConfigError
from strategies.config import (
    MAX_WIDTH,
    MLPConfig,
    OptimizerConfig,
    StrategyConfig,
    supervised_eval_metrics,
)
from strategies.registry import register

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.data.source import DatasetInfo


def _paper_optimizer() -> OptimizerConfig:
    return OptimizerConfig(kind="adamw", lr=1e-3, weight_decay=1e-3)


@register("strategies.noprop.driver:NoPropStrategy")
class NoPropConfig(StrategyConfig):
    """NoProp-DT: T blocks, one worker each, every block learning on its own to denoise a
    noisy label embedding; no activation or gradient crosses blocks in training, and only
    inference chains them."""

    kind: Literal["noprop"] = Field(default="noprop", description="This strategy.")
    blocks: int = Field(default=10, ge=1, description="T: denoising blocks, one worker each.")
    eta: float = Field(
        default=0.1, gt=0, description="η, the weight of the denoising terms (Eq. 8)."
    )
    schedule: Literal["cosine"] = Field(
        default="cosine",
        description="The noise schedule ᾱ_t: a cosine with ᾱ_0 = 0 (this project's choice; "
        "the paper's DT schedule is not known).",
    )
    embedding: Literal["onehot", "learned"] = Field(
        default="onehot",
        description="Label embedding W_Embed: `onehot` (fixed identity, one dimension per "
        "class) or `learned` (trained by the last block with the classifier and sent to "
        "the others every embed_sync_every steps).",
    )
    embedding_dim: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WIDTH,
        description="Dimensions of a learned embedding (default: the class count); onehot "
        "has exactly one per class.",
    )
    embed_sync_every: int = Field(
        default=1, ge=1, description="Steps between sending a learned embedding to the blocks."
    )
    width: int = Field(
        default=256,
        ge=1,
        le=MAX_WIDTH,
        description="Features of each block's x branch, z branch and fused layers.",
    )
    dropout: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="After each pooled conv stage (image data)."
    )
    batches_per_step: int = Field(
        default=20, gt=0, description="Batches each block trains on per step."
    )
    optimizer: OptimizerConfig = Field(
        default_factory=_paper_optimizer,
        description="Each block's own (AdamW lr 1e-3, weight decay 1e-3 [secondary]).",
    )

    def num_workers(self) -> int:
        return self.blocks

    def gradient_batches_per_step(self) -> int:
        return self.batches_per_step

    def hyperparameter_names(self) -> list[str]:
        return ["lr"]

    def eval_metrics(self, run: RunConfig) -> tuple[str, ...]:
        return supervised_eval_metrics(run)

    def summary(self) -> str:
        return f"{self.blocks} denoising blocks, one worker each"

    def check_against(self, run: RunConfig) -> None:
        """A classification data set; for tables the x branch is ``model.hidden``'s MLP, for
        images the paper's CNN (the model section is not read)."""
        if run.data is None:
            return
        kind = run.data.kind
        if kind == "tokens":
            raise ConfigError(
                "data: strategy 'noprop' classifies tables or images, but the data gives "
                "token windows; use a table or image data set (e.g. dataset: digits)"
            )
        if not isinstance(run.model, MLPConfig):
            where = {
                "table": "its x branch is an MLP of model.hidden",
                "image": "its x branch is the paper's CNN and the model section is not read",
            }[kind]
            raise ConfigError(
                f"model.kind: {run.model.kind!r} is not used by strategy 'noprop' ({where}); "
                "remove model.kind (or set it to mlp)"
            )
        if self.embedding == "onehot" and self.embedding_dim is not None:
            classes = run.data.num_classes
            if classes is not None and classes != self.embedding_dim:
                raise self._onehot_dim_error(classes)

    def _onehot_dim_error(self, classes: int) -> ConfigError:
        return ConfigError(
            f"strategy.embedding_dim: {self.embedding_dim} with embedding: onehot, which has "
            f"one dimension per class ({classes}); remove embedding_dim, or set embedding: "
            "learned"
        )

    def check_with_data(self, run: RunConfig, dataset: DatasetInfo) -> None:
        """Build one block and run it once: an image too small for three 2x2 poolings, or
        an embedding that does not fit the classes, fails here, before any worker starts."""
        from strategies.noprop.denoiser import check_denoiser

        classes = dataset.input.num_classes
        if self.embedding == "onehot" and self.embedding_dim not in (None, classes):
            raise self._onehot_dim_error(classes)
        check_denoiser(self, run.model, dataset.input)

    def embedding_size(self, classes: int) -> int:
        """d: the embedding's dimensions for ``classes`` classes."""
        return classes if self.embedding_dim is None else self.embedding_dim
