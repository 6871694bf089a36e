"""The config sections every strategy shares: its own section's base, the optimizer, the model.

Plain pydantic, no torch and no Ray: a run config is validated (`unlocked validate`) without
loading either. Each strategy's ``config.py`` subclasses ``StrategyConfig``; the hooks below
are everything the controller and PBT ask of a config before anything starts, each with a
default, so a strategy overrides what it needs and nothing is probed for.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


class StrategyConfig(BaseModel):
    """Base of every strategy's own config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: str = Field(description="Which strategy this section configures.")
    driver: ClassVar[str]
    """``module:Class`` of the strategy this section configures (set by ``registry.register``);
    imported only when a run starts, so validation loads none of its Ray or torch code."""

    @abstractmethod
    def num_workers(self) -> int:
        """Workers (placement-group bundles) the strategy needs, known before it starts."""

    def hyperparameter_names(self) -> list[str]:
        """The keys of ``Strategy.hyperparameters()``, known before the strategy is built,
        so PBT can check a search space when the config is loaded."""
        return []

    def requires_data(self) -> bool:
        """Whether the run needs a ``data`` section (False: the strategy makes its own)."""
        return True

    def check_against(self, run: RunConfig) -> None:
        """Checks that need the rest of the run config (the model, the data); raise
        ``ConfigError`` naming the field and the fix."""

    def workers_that_fit(self, available: Mapping[str, float], cpus: float, gpus: float) -> int:
        """Workers to reserve, once the cluster's free resources are known; a strategy that
        scales to the cluster (PBT's slots) asks for what fits."""
        return self.num_workers()

    def summary(self) -> str:
        """What ``unlocked validate`` says the run will start."""
        return f"{self.num_workers()} worker(s)"


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["adam", "adamw", "sgd"] = Field(default="adam", description="The optimizer.")
    lr: float = Field(default=1e-3, gt=0, description="Learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled for adamw, L2 else.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD only.")


class ModelConfig(BaseModel):
    """The network every data strategy trains (``strategies.network`` builds it)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["mlp"] = Field(default="mlp", description="The model family.")
    hidden: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [256, 256, 256, 256],
        min_length=1,
        description="Widths of the hidden layers; the pipeline cuts these into blocks.",
    )
    activation: Literal["relu", "gelu", "tanh"] = Field(
        default="relu", description="After each hidden layer's normalisation."
    )
    norm: Literal["layernorm", "batchnorm", "none"] = Field(
        default="layernorm", description="Normalisation of each hidden layer."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="After each activation.")
