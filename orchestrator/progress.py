"""Progress of the step loop: a live bar on a terminal, periodic log lines elsewhere.

CI logs and `ray job logs` are not terminals; a redrawn bar there is noise, so they get
one plain line every ``every_s`` seconds instead.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("unlocked")

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
"""The one format of a run's log lines: ours, and the libraries' (the CLI sets it up; Ray's
driver logger is handed it at ``ray.init``, which takes a format but no date format)."""


class StepProgress:
    """``headline``: the metrics shown, the strategy's own (``Strategy.headline_metrics``),
    each with its latest value (evaluations come every few steps)."""

    def __init__(
        self,
        total: int,
        headline: tuple[str, ...],
        start: int = 0,
        every_s: float = 10.0,
        tty: bool | None = None,
    ):
        self.total, self.start_step, self.every_s = total, start, every_s
        self.headline = headline
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.last_line = float("-inf")
        self.shown: dict[str, float] = {}
        self.bar: Progress | None = None

    def __enter__(self) -> StepProgress:
        if self.tty:
            self.bar = Progress(
                TextColumn("[bold]step"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.2f} steps/s"),
                TextColumn("{task.fields[summary]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(
                "train", total=self.total, completed=self.start_step, rate=0.0, summary=""
            )
        return self

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.shown.update({k: v for k, v in metrics.items() if k in self.headline})
        elapsed = time.monotonic() - self.started
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=step, rate=rate, summary=self._summary())
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_s or step >= self.total:
            self.last_line = now
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            log.info(
                "step %d/%d %.2f steps/s eta %.0fs %s",
                step,
                self.total,
                rate,
                eta,
                self._summary(),
            )

    def _summary(self) -> str:
        return " ".join(f"{k}={self.shown[k]:.4g}" for k in self.headline if k in self.shown)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()
