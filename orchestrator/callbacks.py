"""Callbacks: code of the user's own, called at the points of a run's life.

As Ray Tune's and Lightning's callbacks, a subclass overrides the hooks it needs; every
hook has a default that does nothing. Each receives the live run (``ActiveRun``: its
config, its strategy, its step), so a callback can read anything the controller can,
e.g. stop early by raising, export the model at a step, or send metrics elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.controller import ActiveRun
    from orchestrator.results import RunResult
    from strategies.base import Metrics


class Callback:
    def on_step_end(self, run: ActiveRun, step: int, metrics: Metrics) -> None:
        """After step ``step`` trained, was evaluated (when due), logged and checkpointed."""

    def on_checkpoint(self, run: ActiveRun, step: int, path: str) -> None:
        """A complete checkpoint of step ``step`` was written to ``path``."""

    def on_failure(self, run: ActiveRun, error: BaseException, failures: int) -> None:
        """A worker was lost (``failures`` so far); the run is about to go back to its
        newest checkpoint."""

    def on_finish(self, run: ActiveRun, result: RunResult) -> None:
        """The run ended normally or by a signal, after its final checkpoint and artifacts."""
