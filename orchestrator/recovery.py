"""Losing a worker and coming back: one set of exceptions, one failure budget, one builder.

The controller and PBT's slots recover through these same pieces: ``build_strategy`` is
how every strategy is made (a plain run's, a restored run's, each PBT trial's), and every
loss is charged to the run's one ``FailureBudget``, wherever in the run it happened.

A worker whose constructor refused what it was given (a ``UserError``: a custom module
that rejects its arguments, a data root gone on that node) also reaches the driver as a
dead actor, but rebuilding it would refuse again: that loss is the user's mistake, raised
at once as itself and never charged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError

from orchestrator.errors import ClusterError, ConfigError, RunFailed, UserError
from strategies.registry import strategy_class

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.context import RunContext
    from strategies.base import Strategy

log = logging.getLogger("unlocked")

# A lost object (a state held only by a node that died) sends the run back to its last
# checkpoint like a lost worker does.
WORKER_LOST = (RayActorError, ActorUnavailableError, ObjectLostError)

_KINDS: dict[str, type[UserError]] = {
    "ConfigError": ConfigError,
    "ClusterError": ClusterError,
    "UserError": UserError,
}
"""The kinds a refused setup is raised again as, the most specific first (a subclass of
one of them comes back as that one)."""
_REFUSED = "unlocked: a worker's setup refused its input: "


class SetupRefused(Exception):
    """Raised in a worker's constructor in place of the ``UserError`` it raised.

    Ray keeps only the text of an exception raised in an actor's ``__init__`` (the
    ``ActorDiedError`` the driver receives has no cause), so this one's text is a marker
    and the error's kind and message on one JSON line, which ``refused_setup`` reads back.
    """

    @classmethod
    def carrying(cls, error: UserError) -> SetupRefused:
        kind = next(name for name, known in _KINDS.items() if isinstance(error, known))
        return cls(_REFUSED + json.dumps({"kind": kind, "message": str(error)}))


def refused_setup(err: BaseException) -> UserError | None:
    """The ``UserError`` a worker's constructor raised, if that is why ``err`` says the
    worker is lost; None for any other loss."""
    if not isinstance(err, RayActorError) or not err.actor_init_failed:
        return None
    text = str(err)
    start = text.rfind(_REFUSED)
    if start < 0:
        return None
    try:
        record = json.loads(text[start + len(_REFUSED) :].partition("\n")[0])
        return _KINDS.get(record["kind"], UserError)(str(record["message"]))
    except (ValueError, KeyError, TypeError):  # the text was cut or is not ours
        return None


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
        log what recovery does (``then``). A worker that refused its input is no loss: its
        ``UserError`` is raised, uncounted."""
        mistake = refused_setup(err)
        if mistake is not None:
            raise mistake from err
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
    ``saved`` when given. A rebuilt strategy is always a new object: no hook runs twice.
    A worker that refused its input while being set up raises its ``UserError``."""
    strategy = strategy_class(config.strategy.kind)(config.strategy)
    try:
        strategy.setup(ctx)
        if saved is not None:
            strategy.restore(saved)
    except WORKER_LOST as err:
        mistake = refused_setup(err)
        if mistake is None:
            raise
        raise mistake from err
    return strategy
