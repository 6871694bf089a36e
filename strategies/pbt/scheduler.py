"""The decisions of population based training, without Ray: which trial runs next, who is
ranked against whom, who copies whom, and what the copy's new hyperparameters are.

Asynchronous mode (the paper's and Ray Tune's default) ranks a trial the moment it
finishes a perturbation interval, against the latest scores of the others; a trial in
the bottom quantile takes the state of a random trial from the top quantile (exploit)
and that trial's hyperparameters, perturbed or resampled (explore). Synchronous mode
ranks the whole population once every trial has finished the same interval.

Trials are handed to free slots fewest-steps-first, so when there are more trials than
slots every trial advances at the same pace. All randomness comes from one seeded
``random.Random``, so a fixed seed gives the same decisions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from strategies.pbt.search_space import SearchSpace, Value, explore, sample_space

Mode = Literal["max", "min"]
Hyperparameters = dict[str, Value]


@dataclass
class Trial:
    id: int
    hyperparameters: Hyperparameters
    step: int = 0
    """Inner-strategy steps behind the trial's current state (inherited on exploit)."""
    segments: int = 0
    """Perturbation intervals this trial has run itself."""
    score: float | None = None
    """Latest reported score (None before the first report). A trial that has just been
    replaced keeps its old score until it reports again, as in Ray Tune: it still ranks
    at the bottom for the others, instead of leaving the ranking and making the bottom
    quantile of those left a larger share of the population."""
    schedule: list[tuple[int, Hyperparameters]] = field(default_factory=list)
    """(first step, values) of every stretch of training behind the current state."""
    running: bool = False


@dataclass(frozen=True)
class Exploit:
    """One exploit-and-explore: ``trial`` took ``donor``'s state at ``step``."""

    segment: int
    trial: int
    donor: int
    step: int
    score: float | None
    donor_score: float
    old: Hyperparameters
    new: Hyperparameters


def quantiles(scores: Mapping[int, float], mode: Mode, fraction: float) -> tuple[list, list]:
    """(bottom, top) trial ids, each ``ceil(n * fraction)`` long but at most half of n.
    Ties are broken by id; a NaN score counts as the worst."""

    def goodness(trial: int) -> tuple[float, int]:
        value = scores[trial]
        if math.isnan(value):
            return (-math.inf, trial)
        return (value if mode == "max" else -value, trial)

    order = sorted(scores, key=goodness)
    count = math.ceil(len(order) * fraction)
    count = min(count, len(order) // 2)
    if count == 0:
        return [], []
    return order[:count], order[-count:]


def is_better(a: float, b: float, mode: Mode) -> bool:
    return a > b if mode == "max" else a < b


class PbtScheduler:
    def __init__(
        self,
        population: int,
        space: SearchSpace,
        *,
        mode: Mode,
        quantile_fraction: float,
        resample_probability: float,
        factors: Sequence[float],
        synchronous: bool,
        seed: int,
        burn_in: int = 0,
    ) -> None:
        self.space, self.mode = space, mode
        self.quantile_fraction = quantile_fraction
        self.resample_probability = resample_probability
        self.factors = list(factors)
        self.synchronous = synchronous
        self.burn_in = burn_in
        self.rng = random.Random(seed)
        self.trials = []
        for i in range(population):
            values = sample_space(space, self.rng)
            self.trials.append(Trial(i, values, schedule=[(0, dict(values))]))
        self.generation = 0
        self.completed = 0
        self.events: list[Exploit] = []

    # -- scheduling -----------------------------------------------------------------
    def next_trial(self) -> Trial | None:
        """The waiting trial whose weights have trained least, inherited steps included,
        as Ray Tune's PBT picks (None: nothing may start now)."""
        idle = [t for t in self.trials if not t.running]
        if self.synchronous:
            idle = [t for t in idle if t.segments == self.generation]
        if not idle:
            return None
        trial = min(idle, key=lambda t: (t.step, t.segments, t.id))
        trial.running = True
        return trial

    def release(self, trial_id: int) -> None:
        """A launched segment was lost: the trial waits to run it again."""
        self.trials[trial_id].running = False

    def report(
        self, trial_id: int, step: int, score: float, remaining: int | None = None
    ) -> list[Exploit]:
        """A trial finished an interval at ``step`` with ``score``; return the exploits due.
        ``remaining``: intervals of the budget not yet started (None: no limit). A trial is
        only replaced if it will still get one of them: a copy that never trains would
        only throw its steps away."""
        trial = self.trials[trial_id]
        trial.running = False
        trial.step, trial.score = step, float(score)
        trial.segments += 1
        self.completed += 1
        if self.synchronous:
            if any(t.segments <= self.generation for t in self.trials):
                return []
            self.generation += 1
            return self._exploit(self.trials, remaining)
        return self._exploit([trial], remaining)

    def _will_run(self, trial: Trial, step: int, remaining: int | None) -> bool:
        """Whether ``trial``, at ``step``, is among the next ``remaining`` launches."""
        if remaining is None:
            return True
        key = (step, trial.segments, trial.id)
        ahead = sum(
            1
            for t in self.trials
            if t is not trial and not t.running and (t.step, t.segments, t.id) < key
        )
        return ahead < remaining

    def _exploit(self, candidates: list[Trial], remaining: int | None) -> list[Exploit]:
        scored = {t.id: t.score for t in self.trials if t.score is not None}
        bottom, top = quantiles(scored, self.mode, self.quantile_fraction)
        events = []
        for trial in candidates:
            if trial.id not in bottom or trial.step < self.burn_in:
                continue
            donor = self.trials[self.rng.choice(top)]
            if not self._will_run(trial, donor.step, remaining):
                continue
            new = explore(
                donor.hyperparameters,
                self.space,
                self.rng,
                self.resample_probability,
                self.factors,
            )
            event = Exploit(
                segment=self.completed,
                trial=trial.id,
                donor=donor.id,
                step=donor.step,
                score=trial.score,
                donor_score=donor.score,  # type: ignore[arg-type]
                old=dict(trial.hyperparameters),
                new=new,
            )
            trial.hyperparameters = dict(new)
            trial.step = donor.step
            trial.schedule = [e for e in donor.schedule if e[0] < donor.step]
            trial.schedule.append((donor.step, dict(new)))
            events.append(event)
        self.events.extend(events)
        return events

    # -- results --------------------------------------------------------------------
    def best(self) -> Trial | None:
        """The trial with the best latest score; a NaN (a diverged trial) never wins."""
        scored = [t for t in self.trials if t.score is not None and not math.isnan(t.score)]
        if not scored:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        return max(scored, key=lambda t: (sign * t.score, -t.id))  # type: ignore[operator]

    def scores(self) -> list[float]:
        return [t.score for t in self.trials if t.score is not None]

    # -- checkpoints ----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "generation": self.generation,
            "completed": self.completed,
            "trials": [{**asdict(t), "running": False} for t in self.trials],
            "events": [asdict(e) for e in self.events],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.generation = int(state["generation"])
        self.completed = int(state["completed"])
        self.trials = []
        for t in state["trials"]:
            schedule = [(int(s), dict(v)) for s, v in t["schedule"]]
            self.trials.append(Trial(**{**t, "schedule": schedule, "running": False}))
        self.events = [Exploit(**e) for e in state["events"]]
