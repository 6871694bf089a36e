"""What one chaos scenario reports, and how the benchmark adds scenarios up.

Every scenario runs a fault-free reference and the same seed with faults, then compares:
the two runs must end on the same metrics (within noise) with every MLflow step logged once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FaultOutcome:
    """One scenario's result.

    ``metric_delta`` is the largest absolute difference of a final metric between the run
    with faults and its fault-free reference (0.0 when they are bit-identical).
    ``steps_duplicated`` counts MLflow steps logged more than once, ``steps_missing`` those
    never logged; both must be 0 for a recovered run.
    """

    scenario: str
    strategy: str
    faults_injected: int
    faults_recovered: int
    steps_duplicated: int
    steps_missing: int
    metric_delta: float
    seconds: float
    detail: str = ""

    @property
    def clean(self) -> bool:
        return (
            self.faults_recovered == self.faults_injected
            and self.steps_duplicated == 0
            and self.steps_missing == 0
        )


def duplicated_and_missing(steps: Iterable[int], expected: Sequence[int]) -> tuple[int, int]:
    """Count steps logged more than once, and expected steps never logged."""
    counts: dict[int, int] = {}
    for step in steps:
        counts[step] = counts.get(step, 0) + 1
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    missing = sum(1 for step in expected if step not in counts)
    return duplicated, missing


def metric_delta(reference: dict[str, float], faulted: dict[str, float]) -> float:
    """Largest absolute difference over the metrics both runs report; inf when one is NaN."""
    shared = reference.keys() & faulted.keys()
    if not shared:
        raise ValueError("the two runs report no metric in common")
    worst = 0.0
    for name in shared:
        a, b = reference[name], faulted[name]
        if math.isnan(a) or math.isnan(b):
            return math.inf
        worst = max(worst, abs(a - b))
    return worst


@dataclass
class ChaosTotals:
    """The benchmark's summary over every scenario it ran."""

    outcomes: list[FaultOutcome] = field(default_factory=list)

    def add(self, outcome: FaultOutcome) -> None:
        self.outcomes.append(outcome)

    def figures(self) -> dict[str, float | int]:
        return {
            "faults_injected": sum(o.faults_injected for o in self.outcomes),
            "faults_recovered": sum(o.faults_recovered for o in self.outcomes),
            "steps_duplicated": sum(o.steps_duplicated for o in self.outcomes),
            "steps_missing": sum(o.steps_missing for o in self.outcomes),
            "metric_delta": max((o.metric_delta for o in self.outcomes), default=0.0),
        }
