"""The contract between the controller and a training strategy.

A strategy owns its schedule and its workers; the controller owns placement, restarts,
checkpoints and tracking. The only window a strategy has on the controller is the
``RunContext`` it receives in ``setup`` (see ``orchestrator.context``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from orchestrator.context import RunContext

Metrics = dict[str, float]


class StrategyConfig(BaseModel):
    """Base of every strategy's own config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def num_workers(self) -> int:
        """Workers (placement-group bundles) the strategy needs, known before it starts."""
        raise NotImplementedError

    def hyperparameter_names(self) -> list[str]:
        """The keys of ``Strategy.hyperparameters()``, known before the strategy is built,
        so PBT can check a search space when the config is loaded."""
        return []


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD only.")


def check_hyperparameters(values: dict[str, float], known: dict[str, float]) -> None:
    """A key a strategy does not have is an error that lists the ones it has (PBT relies on it)."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KeyError(f"unknown hyperparameters {unknown}; this strategy has {sorted(known)}")


class Strategy(Protocol):
    """What the controller calls. A step is the strategy's natural unit of work."""

    Config: ClassVar[type[StrategyConfig]]

    def setup(self, ctx: RunContext) -> None:
        """Create workers through ``ctx.spawn``; called again after a worker is lost."""

    def step(self) -> Metrics:
        """Run one unit of training; raise (any Ray actor error) if a worker died."""

    def evaluate(self) -> Metrics:
        """Metrics on held-out data, prefixed ``eval/``; per-worker ones ``<worker>/eval/``."""

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: tensors and plain data only."""

    def restore(self, state: dict[str, Any]) -> None: ...

    def hyperparameters(self) -> dict[str, float]: ...

    def set_hyperparameters(self, values: dict[str, float]) -> None: ...

    def export_model(self) -> torch.nn.Module:
        """The trained network as one CPU module, for the run's model artifact."""

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        """Busy intervals (wall-clock start, end) per worker, for the utilisation plot."""

    def peak_training_bytes(self) -> dict[str, int]:
        """Per worker: the most memory one training step needed (see workers.telemetry)."""
