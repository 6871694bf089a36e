"""Losing a worker and coming back: one set of exceptions, one failure budget, one builder.

The controller and PBT's slots recover through these same pieces: ``build_strategy`` is
how every strategy is made (a plain run's, a restored run's, each PBT trial's), and every
loss is charged to the run's one ``FailureBudget``, wherever in the run it happened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError

from orchestrator.errors import RunFailed
from strategies.registry import strategy_class

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.context import RunContext
    from strategies.base import Strategy

log = logging.getLogger("unlocked")

# A lost object (a state held only by a node that died) sends the run back to its last
# checkpoint like a lost worker does.
WORKER_LOST = (RayActorError, ActorUnavailableError, ObjectLostError)


class FailureBudget:
    """``resources.max_failures`` worker losses per run, however they are recovered."""

    def __init__(
        self, limit: int, listener: Callable[[BaseException, int], None] | None = None
    ) -> None:
        self.limit = limit
        self.failures = 0
        self.listener = listener
        """Told of every loss that recovery will handle (the callbacks' ``on_failure``)."""

    def charge(self, err: BaseException, where: str, then: str) -> None:
        """Count one loss at ``where``; raise ``RunFailed`` once the budget is spent, else
        log what recovery does (``then``)."""
        self.failures += 1
        if self.failures > self.limit:
            raise RunFailed(
                f"worker lost {self.failures} times (resources.max_failures={self.limit}); "
                f"last at {where}: {type(err).__name__}: {err}"
            ) from err
        log.warning("worker lost at %s (%s); %s", where, type(err).__name__, then)
        if self.listener is not None:
            self.listener(err, self.failures)


def build_strategy(
    config: RunConfig, ctx: RunContext, saved: dict[str, Any] | None = None
) -> Strategy:
    """The strategy ``config`` describes, its workers started in ``ctx``, restored from
    ``saved`` when given. A rebuilt strategy is always a new object: no hook runs twice."""
    strategy = strategy_class(config.strategy.kind)(config.strategy)
    strategy.setup(ctx)
    if saved is not None:
        strategy.restore(saved)
    return strategy
