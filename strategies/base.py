"""The contract between the controller and a training strategy.

A strategy owns its schedule and its workers; the controller owns placement, restarts,
checkpoints and tracking. The only window a strategy has on the controller is the
``RunContext`` it receives in ``setup`` (see ``orchestrator.context``).

As Ray Tune's ``TrialScheduler``, the base class declares every hook the controller may
call, with a default where one makes sense: the controller calls hooks, it never probes
for them, so a misspelt override is an unused method rather than silently skipped work.

Metric names follow one scheme (``METRIC_SCOPES``): ``train/…`` for what training
reports, ``eval/…`` for held-out figures, ``system/…`` for how the machinery runs
(busy time, memory, failures); a worker's own metric carries its name in front
(``block-1/train/local_loss``) and is logged to that worker's nested MLflow run.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from strategies.config import StrategyConfig

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from orchestrator.context import RunContext

Metrics = dict[str, float]
C = TypeVar("C", bound=StrategyConfig)

METRIC_SCOPES = ("train", "eval", "system")
METRIC_NAME = re.compile(r"^(?:(?P<worker>[a-z]+-\d+(?:/[a-z]+-\d+)*)/)?(?P<scope>[a-z]+)/.+$")


def metric_scope(key: str) -> str | None:
    """The scope of a metric key (``train``, ``eval``, ``system``), None when it has none."""
    match = METRIC_NAME.match(key)
    if match is None or match["scope"] not in METRIC_SCOPES:
        return None
    return match["scope"]


def check_hyperparameters(values: dict[str, float], known: dict[str, float]) -> None:
    """A key a strategy does not have is an error that lists the ones it has (PBT relies on it)."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KeyError(f"unknown hyperparameters {unknown}; this strategy has {sorted(known)}")


class Strategy(ABC, Generic[C]):
    """What the controller calls. A step is the strategy's natural unit of work."""

    Config: ClassVar[type[StrategyConfig]]

    def __init__(self, config: C) -> None:
        self.config = config

    @abstractmethod
    def setup(self, ctx: RunContext) -> None:
        """Create workers through ``ctx.spawn``; after a lost worker the controller builds a
        fresh strategy and calls this again."""

    @abstractmethod
    def step(self) -> Metrics:
        """Run one unit of training; raise (any Ray actor error) if a worker died."""

    def evaluate(self) -> Metrics:
        """Metrics on held-out data, ``eval/…`` and ``<worker>/eval/…``."""
        return {}

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: tensors and plain data only."""

    @abstractmethod
    def restore(self, state: dict[str, Any]) -> None:
        """Load what ``state()`` returned (the strategy has been ``setup``)."""

    def hyperparameters(self) -> dict[str, float]:
        """The values PBT may change; keys as ``Config.hyperparameter_names()``."""
        return {}

    def set_hyperparameters(self, values: dict[str, float]) -> None:
        check_hyperparameters(values, self.hyperparameters())

    def headline_metrics(self) -> tuple[str, ...]:
        """What the progress line shows: the figures a user watches this strategy by."""
        return ("train/loss", "eval/accuracy")

    def export_model(self) -> torch.nn.Module | None:
        """The trained network as one CPU module, for the run's model artifact (None: the
        strategy has no single network to publish)."""
        return None

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        """Busy intervals (wall-clock start, end) per worker, for the utilisation plot."""
        return {}

    def peak_training_bytes(self) -> dict[str, int]:
        """Per worker: the most memory one training step needed (``workers.telemetry``)."""
        return {}

    def artifacts(self) -> dict[str, str | Figure]:
        """The strategy's own records for the run (path: text or figure), e.g. PBT's lineage."""
        return {}

    def close(self) -> None:
        """Release what the strategy holds on its workers before they are killed (the
        pipeline's compiled graph); the workers stay alive. Called once a run ends and
        before recovery kills the workers; safe to call more than once."""
