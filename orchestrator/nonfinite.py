"""What a run does when its loss, fitness or gradient norm turns NaN or infinite.

Left alone, a diverged run trains on NaN weights to its last step and ends as if it had
succeeded. The controller instead checks every step's figures before it checkpoints
them, so a non-finite state never becomes "the last good checkpoint", and then acts on
``run.nonfinite``:

- ``stop`` (the default): end the run as failed, naming the step and the metrics; the
  checkpoints written before stay (``--resume`` needs the same strategy section, so a
  smaller rate is a fresh run, or ``rollback``).
- ``rollback``: go back to the newest intact checkpoint with every learning rate halved
  (from the rate the diverging step ran at, so repeated rollbacks keep halving), at most
  ``run.max_rollbacks`` times, then stop.
- ``skip``: the workers drop each update whose loss or gradient (or, in EGGROLL, each
  member whose fitness) is not finite, before it is applied, and count it in the step's
  ``system/nonfinite_skipped``; the run goes on. The check is the workers' because they
  apply their updates inside a step, before the controller sees its figures. A step's
  figures are those of the updates it applied, so a step that could apply none reports
  NaN and the controller stops the run as ``stop`` would: a diverged run does not spin.

Only run-level figures are watched (``train/loss``, not ``block-2/train/local_loss``):
they are what the strategy says the whole run is doing. A hosted trial's figures
(PBT's ``trial-3/train/loss``) are its host's business; PBT ranks a NaN trial last and
replaces it by exploiting a better one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from orchestrator.errors import ConfigError, RunFailed

Policy = Literal["stop", "rollback", "skip"]

log = logging.getLogger("unlocked")

EVENTS_METRIC = "system/nonfinite_events"
SKIPPED_METRIC = "system/nonfinite_skipped"
"""Updates (or EGGROLL members) of a step left out by ``skip``; logged only under it."""
LR_FACTOR = 0.5
"""Each rollback multiplies the learning rates by this: small enough that a rate just past
the edge of stability comes back inside it within a few rollbacks."""

# The last part of a metric's name that marks a loss, a fitness or a gradient (or update) norm.
_WATCHED_WORDS = ("loss", "fitness")
_WATCHED_SUFFIX = "_norm"


class NonFiniteStop(RunFailed):
    """The run ended because a watched figure was NaN or infinite (``run.nonfinite``)."""

    resumable = False  # the same run would diverge again; its message says what to change


class NonFiniteStep(Exception):
    """Step ``step``'s watched figures ``metrics`` were not finite; raised before the step
    is checkpointed, handled by the controller's policy."""

    def __init__(self, step: int, metrics: Mapping[str, float]) -> None:
        super().__init__(step, dict(metrics))
        self.step = step
        self.metrics = dict(metrics)

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.metrics.items()))
        return f"step {self.step}: {shown}"


def is_watched(key: str, headline: Iterable[str] = ()) -> bool:
    """Whether a non-finite ``key`` means the run diverged: a run-level ``train/`` or
    ``eval/`` loss, fitness or norm, or one of the strategy's headline figures."""
    if key in headline:
        return True
    scope, _, name = key.partition("/")
    if scope not in ("train", "eval") or not name:
        return False
    last = name.rsplit("/", 1)[-1]
    return any(word in last for word in _WATCHED_WORDS) or last.endswith(_WATCHED_SUFFIX)


def nonfinite_metrics(
    metrics: Mapping[str, float], headline: Iterable[str] = ()
) -> dict[str, float]:
    """The watched figures of a step that are NaN or infinite (empty: the step is sound)."""
    headline = tuple(headline)
    return {
        key: float(value)
        for key, value in metrics.items()
        if is_watched(key, headline) and not math.isfinite(value)
    }


def decide(policy: Policy, rollbacks: int, max_rollbacks: int) -> Literal["stop", "rollback"]:
    """What to do about a non-finite step after ``rollbacks`` rollbacks in this run.

    Under ``skip`` the workers have already left out every update they could; a step
    whose watched figures are still not finite applied none (or its evaluation is not
    finite), so it stops."""
    if policy == "rollback" and rollbacks < max_rollbacks:
        return "rollback"
    return "stop"


def is_learning_rate(name: str) -> bool:
    """A hyperparameter that is a learning rate: ``lr`` or a worker's ``lr/block-2``."""
    return name == "lr" or name.startswith("lr/")


def learning_rates(values: Mapping[str, Any], factor: float) -> dict[str, float]:
    """The learning rates among hyperparameter ``values``, multiplied by ``factor``."""
    return {k: float(v) * factor for k, v in values.items() if is_learning_rate(k)}


SKIP_REFUSED = {
    "moe_hc": "its experts' constrained solves and the basis network's implicit-function "
    "step are one coupled update, which no worker can drop alone",
}
"""Strategies that cannot drop a single update, and why."""


def check_policy(
    policy: Policy,
    kind: str,
    hyperparameter_names: Iterable[str],
    inner_kind: str | None = None,
) -> None:
    """Refuse a policy a strategy cannot carry out, when the config is validated.

    ``rollback`` needs a learning rate to halve: without one it would replay the same
    steps into the same NaN until its rollbacks ran out. ``skip`` needs workers that can
    drop one update; ``inner_kind`` is the strategy a host (PBT) runs, whose workers skip.
    """
    if policy == "rollback" and not any(is_learning_rate(n) for n in hyperparameter_names):
        raise ConfigError(
            f"run.nonfinite: 'rollback' halves the learning rate, and strategy {kind!r} has "
            "none of its own (PBT replaces a diverged trial itself); use run.nonfinite: stop"
        )
    for name in (kind, inner_kind):
        if policy == "skip" and name in SKIP_REFUSED:
            raise ConfigError(
                f"run.nonfinite: 'skip' is not possible for strategy {name!r}: "
                f"{SKIP_REFUSED[name]}; use run.nonfinite: rollback or stop"
            )


def mean_of_applied(losses: Sequence[float], applied: Sequence[bool]) -> float:
    """The mean loss of the batches whose update was applied: NaN when none was, so a
    step that ``skip`` emptied stops the run instead of reporting a figure it never had.
    With every batch applied (any other policy) it is the plain mean, NaN included."""
    kept = [loss for loss, ok in zip(losses, applied, strict=True) if ok]
    return sum(kept, 0.0) / len(kept) if kept else math.nan  # summed as before skip existed


def skipped_figures(skipped: int, what: str) -> dict[str, float]:
    """A step's ``system/nonfinite_skipped`` under ``skip``, with one warning line when it
    left something out: ``what`` names it (``"update"``, ``"member"``)."""
    if skipped:
        log.warning(
            "left out %d %s(s) whose loss, gradient or fitness was not finite "
            "(run.nonfinite: skip)",
            skipped,
            what,
        )
    return {SKIPPED_METRIC: float(skipped)}


def stop_message(
    event: NonFiniteStep,
    policy: Policy,
    rollbacks: int,
    max_rollbacks: int,
    checkpoint: str | None,
) -> str:
    """The one message a run stopped by a non-finite figure ends with: which step and
    metrics, why it stopped, what is kept and what to change."""
    if policy == "rollback":
        why = (
            f"after {rollbacks} rollback(s) with halved learning rates (run.max_rollbacks="
            f"{max_rollbacks})"
        )
    elif policy == "skip":
        why = (
            "because run.nonfinite is 'skip' and the step had no finite update left to "
            "apply (or its evaluation was not finite)"
        )
    else:
        why = "because run.nonfinite is 'stop'"
    kept = (
        f"the last good checkpoint is kept in {checkpoint}"
        if checkpoint is not None
        else "no checkpoint was written before it"
    )
    fix = "lower the learning rate or check the data for NaN/inf values" + (
        "" if policy == "rollback" else ", or set run.nonfinite: rollback to go back and halve it"
    )
    return f"training diverged at {event} (not finite); the run stopped {why}, and {kept}; {fix}"
