"""A per-step record that a run of any length can keep in memory.

A run's step metrics (``RunResult.history``) and the curves behind its plots are kept by
the driver for the whole run. Kept whole, they grow by a few KB a step: a week-long run
would hold gigabytes for a record MLflow already has in full. ``ThinnedSteps`` keeps every
step until it holds ``capacity`` of them, then every 2nd step, then every 4th, and so on,
always with the first and the latest step: the whole curve at an even, coarser grain.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ThinnedSteps(Generic[T]):
    """``step -> value`` for at most ``capacity`` steps: those on the stride, the first
    and the latest. The stride doubles each time one more would overfill it."""

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError(f"capacity: {capacity}; keep at least 2 steps")
        self.capacity = capacity
        self.stride = 1
        self._kept: dict[int, T] = {}
        self._first: int | None = None
        self._latest: int | None = None

    def put(self, step: int, value: T) -> None:
        """Record ``step`` (replacing a value it had). A new latest step replaces the one
        before it unless that one is on the stride or is the first."""
        latest = self._latest
        if latest is not None and step > latest and latest % self.stride and latest != self._first:
            del self._kept[latest]
        self._kept[step] = value
        if self._first is None or step < self._first:
            self._first = step
        self._latest = step if latest is None else max(latest, step)
        while len(self._kept) > self.capacity:  # ends: at most the first and the latest stay
            self.stride *= 2
            self._kept = {s: v for s, v in self._kept.items() if self._keeps(s)}

    def truncate(self, last: int) -> None:
        """Forget every step after ``last`` (a run gone back to a checkpoint replays them)."""
        self._kept = {s: v for s, v in self._kept.items() if s <= last}
        self._latest = max(self._kept, default=None)
        if not self._kept:
            self._first = None

    def items(self) -> list[tuple[int, T]]:
        """The kept ``(step, value)`` pairs in step order."""
        return sorted(self._kept.items())

    @property
    def latest(self) -> int | None:
        """The last step put (after a truncation, the last one left)."""
        return self._latest

    def __len__(self) -> int:
        return len(self._kept)

    def _keeps(self, step: int) -> bool:
        return step % self.stride == 0 or step in (self._first, self._latest)
