"""Population based training over any other strategy.

Each trial is an inner strategy (backprop, pipeline, EGGROLL, ...) with its own
hyperparameters. The run's placement group is cut into slots, one inner strategy's
workers each, driven by a ``TrialRunner`` actor. Trials are scheduled onto slots
fewest-steps-first; a slot runs one perturbation interval (``interval`` inner steps and an
evaluation), hands back the score, and keeps the resulting state in the object store.
The decisions (rank, exploit, explore) are ``strategies.pbt.scheduler``'s; this module
moves states and hyperparameters between slots and keeps the books.

One PBT step is ``population`` finished intervals, so ``stop.max_steps`` is a budget of
``max_steps x population`` intervals however the trials are interleaved. In asynchronous
mode a slot that finishes starts the next waiting trial at once, across step boundaries,
so no slot idles while trials wait to be ranked; synchronous mode waits for the whole
population at every interval, and idles only at the end of each generation.

All trials share the run seed (initial weights and data order), so trials differ only
in their hyperparameters, any slot can host any trial, and the winner's hyperparameter
schedule replayed as a single run retraces its lineage.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import ray
import torch
import yaml

from orchestrator.errors import UserError
from orchestrator.recovery import WORKER_LOST
from orchestrator.schedule import SCHEDULE_FORMAT
from strategies.base import Metrics, Strategy
from strategies.pbt.config import PbtConfig, inner_run_config
from strategies.pbt.scheduler import PbtScheduler
from workers.trial import TrialRunner

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.context import RunContext


def population_scheduler(config: PbtConfig, seed: int) -> PbtScheduler:
    """The scheduler a PBT run starts from: its trials' initial values follow the seed."""
    return PbtScheduler(
        config.population,
        config.search_space,
        mode=config.mode,
        quantile_fraction=config.quantile_fraction,
        resample_probability=config.resample_probability,
        factors=config.perturbation_factors,
        synchronous=config.synchronous,
        seed=seed,
        burn_in=config.burn_in,
    )


@dataclass
class Slot:
    index: int
    runner: Any
    holds: Any = None
    """The state reference the runner's live state equals (None: unknown)."""
    respawns: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list)
    peaks: dict[str, int] = field(default_factory=dict)


@dataclass
class Segment:
    slot: Slot
    trial: int
    state: Any
    exploit: bool
    """The trial starts from a state it has just copied (its load is exploit time)."""


@dataclass
class Books:
    """Where the slots' time went, in seconds, since this process started the population."""

    started: float = 0.0
    busy_s: float = 0.0
    exploit_s: float = 0.0
    switch_s: float = 0.0
    capture_s: float = 0.0
    failures: int = 0


def hyperparameter_number(config: PbtConfig, name: str, value: Any) -> float:
    """A value as a plottable number: a choice becomes its option's index."""
    options = config.search_space[name].choice
    if options is not None:
        return float(list(options).index(value)) if value in options else math.nan
    return float(value)


class PbtStrategy(Strategy[PbtConfig]):
    Config = PbtConfig

    def __init__(self, config: PbtConfig) -> None:
        super().__init__(config)
        self.latest: dict[int, Metrics] = {}
        self.books = Books()
        self.pending: Metrics = {}

    # -- set-up and checkpoints -----------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        cfg = self.config
        self.ctx = ctx
        self.inner_config = inner_run_config(ctx.config)
        per_slot = cfg.slot_workers()
        count = ctx.placement_group.bundle_count // per_slot
        self.slots = [Slot(i, self._spawn_runner(i, 0)) for i in range(count)]
        initial = self.slots[0].runner.state.remote()
        ray.get([slot.runner.ready.remote() for slot in self.slots])
        for slot in self.slots:  # same seed, same initial weights: nothing to load
            slot.holds = initial
        self.budget = ctx.config.stop.max_steps * cfg.population
        self.scheduler = population_scheduler(cfg, ctx.seed)
        self.states = {t.id: initial for t in self.scheduler.trials}
        # Trials whose values differ from those their state carries (new, or just copied
        # and explored): set at their next launch, and only then, so that a strategy's own
        # schedule (EGGROLL's decaying sigma) runs on between explores, as a replay does.
        # A fresh trial that has already run an interval has just copied another.
        self.fresh: set[int] = set(self.states)
        self.inflight: dict[Any, Segment] = {}

    def _spawn_runner(self, index: int, respawns: int) -> Any:
        per_slot = self.config.slot_workers()
        prefix = f"slot-{index}/" if respawns == 0 else f"slot-{index}/r{respawns}/"
        return self.ctx.spawn(
            TrialRunner,
            self.ctx.for_trial(
                self.inner_config, index * per_slot, f"{prefix}g{self.ctx.generation}/"
            ),
            role="runner" if respawns == 0 else f"runner-r{respawns}",  # names stay unique
            index=index * per_slot,
            num_cpus=0,
            num_gpus=0,
        )

    def state(self) -> dict[str, Any]:
        unique: list[Any] = []
        index = []
        for trial in self.scheduler.trials:
            ref = self.states[trial.id]
            if ref not in unique:
                unique.append(ref)
            index.append(unique.index(ref))
        values = ray.get(unique)
        out: dict[str, Any] = {f"trial-state-{i}": v for i, v in enumerate(values)}
        out["population"] = {
            "scheduler": self.scheduler.state(),
            "state_of_trial": index,
            "latest": {str(k): v for k, v in self.latest.items()},
            "fresh": sorted(self.fresh),
            "failures": self.books.failures,
        }
        return out

    def restore(self, state: dict[str, Any]) -> None:
        population = state["population"]
        self.scheduler.restore(population["scheduler"])
        count = sum(1 for key in state if key.startswith("trial-state-"))
        refs = [ray.put(state[f"trial-state-{i}"]) for i in range(count)]
        self.states = {t: refs[i] for t, i in enumerate(population["state_of_trial"])}
        self.latest = {int(k): dict(v) for k, v in population["latest"].items()}
        self.fresh = set(population["fresh"])
        self.books.failures = int(population["failures"])
        for slot in self.slots:
            slot.holds = None

    # -- the population's loop ------------------------------------------------------
    def step(self) -> Metrics:
        if not self.books.started:
            self.books.started = time.time()
        self.pending = {}
        goal = min(self.budget, self.scheduler.completed + self.config.population)
        while self.scheduler.completed < goal:
            self._launch()
            if not self.inflight:
                raise RuntimeError("PBT: no trial can run and none is running (a bug)")
            ready, _ = ray.wait(list(self.inflight), num_returns=1)
            self._complete(ready[0])
        self._launch()  # asynchronous: the slots go on while the controller logs
        return {**self.pending, **self._summary()}

    def _launched(self) -> int:
        return self.scheduler.completed + len(self.inflight)

    def _launch(self) -> None:
        """Give every idle slot a trial, preferring the slot that already holds its state."""
        busy = {id(seg.slot) for seg in self.inflight.values()}
        idle = [s for s in self.slots if id(s) not in busy]
        while idle and self._launched() < self.budget:
            trial = self.scheduler.next_trial()
            if trial is None:
                return
            ref = self.states[trial.id]
            holders = [s for s in idle if s.holds is not None and s.holds == ref]
            slot = holders[0] if holders else idle[0]
            idle.remove(slot)
            fresh = trial.id in self.fresh
            values = dict(trial.hyperparameters) if fresh else None
            report, new_state = slot.runner.run.options(num_returns=2).remote(
                None if holders else ref, values, self.config.interval
            )
            slot.holds = None
            exploit = fresh and trial.segments > 0
            self.inflight[report] = Segment(slot, trial.id, new_state, exploit)

    def _complete(self, ref: Any) -> None:
        segment = self.inflight.pop(ref)
        try:
            report = ray.get(ref)
        except WORKER_LOST as err:
            self._lose(segment, err)
            return
        metrics = report["metrics"]
        if self.config.metric not in metrics:
            raise UserError(
                f"strategy.metric: {self.config.metric!r} is not among the metrics a "
                f"{self.config.inner.kind!r} trial reports: {sorted(metrics)}"
            )
        books, slot = self.books, segment.slot
        start, end = report["span"]
        books.busy_s += end - start
        books.capture_s += report["capture_s"]
        if segment.exploit:
            books.exploit_s += report["load_s"]
        else:
            books.switch_s += report["load_s"]
        slot.spans.append((start, end))
        slot.peaks = dict(report["peak_training_bytes"])
        slot.holds = segment.state
        trial = self.scheduler.trials[segment.trial]
        self.states[trial.id] = segment.state
        self.fresh.discard(trial.id)
        self.latest[trial.id] = dict(metrics)
        step = trial.step + self.config.interval
        self._record(trial.id, metrics, step)
        score = float(metrics[self.config.metric])
        unlaunched = self.budget - self._launched() - 1  # this interval is no longer in flight
        for event in self.scheduler.report(trial.id, step, score, remaining=unlaunched):
            self.states[event.trial] = self.states[event.donor]
            self.fresh.add(event.trial)
            self.pending[f"trial-{event.trial}/train/exploit_donor"] = float(event.donor)
            self._record(event.trial, {}, event.step)

    def _record(self, trial_id: int, metrics: Metrics, step: int) -> None:
        prefix = f"trial-{trial_id}/"
        self.pending.update({prefix + k: float(v) for k, v in metrics.items()})
        self.pending[prefix + "train/inner_step"] = float(step)
        for name, value in self.scheduler.trials[trial_id].hyperparameters.items():
            number = hyperparameter_number(self.config, name, value)
            self.pending[f"{prefix}train/hp/{name}"] = number

    def _lose(self, segment: Segment, err: BaseException) -> None:
        """A slot's runner or one of its workers died: charge the run's failure budget and
        rebuild the slot (a new runner builds its trial as the controller builds a run);
        the trial runs the interval again from its last state, the other slots go on."""
        slot = segment.slot
        self.ctx.failures.charge(
            err, f"PBT slot {slot.index} (trial {segment.trial})", "rebuilding the slot"
        )
        self.books.failures += 1
        self.scheduler.release(segment.trial)
        ray.kill(slot.runner, no_restart=True)  # its workers go with it (owned actors)
        slot.respawns += 1
        slot.runner = self._spawn_runner(slot.index, slot.respawns)
        slot.holds = None

    def _summary(self) -> Metrics:
        scores = self.scheduler.scores()
        books = self.books
        capacity = len(self.slots) * max(1e-9, time.time() - books.started)
        out = {
            "train/segments": float(self.scheduler.completed),
            "train/exploits": float(len(self.scheduler.events)),
            "system/busy_fraction": books.busy_s / capacity,
            "system/exploit_overhead": books.exploit_s / capacity,
            "system/switch_overhead": books.switch_s / capacity,
            "system/capture_overhead": books.capture_s / capacity,
            "system/slot_failures": float(books.failures),
        }
        if scores:
            out["train/best_score"] = self.scheduler.best().score  # type: ignore[union-attr]
            out["train/median_score"] = statistics.median(scores)
        return out

    def _quiesce(self) -> None:
        """Let in-flight intervals end and drop them (a run stopped early): the slots are
        then free and alive, and every trial's state is its last one accounted for."""
        for ref, segment in list(self.inflight.items()):
            del self.inflight[ref]
            try:
                ray.get(ref)
            except WORKER_LOST as err:
                self._lose(segment, err)
                continue
            self.scheduler.release(segment.trial)
            segment.slot.holds = None

    # -- results --------------------------------------------------------------------
    def evaluate(self) -> Metrics:
        """The best trial's latest held-out metrics (no extra work: trials evaluate at the
        end of every interval)."""
        best = self.scheduler.best()
        if best is None:
            return {}
        metrics = {k: v for k, v in self.latest[best.id].items() if k.startswith("eval/")}
        return {**metrics, "eval/best_trial": float(best.id)}

    def headline_metrics(self) -> tuple[str, ...]:
        return ("train/best_score", "train/segments")

    def export_model(self) -> torch.nn.Module:
        """The best trial's network."""
        self._quiesce()
        best = self.scheduler.best() or self.scheduler.trials[0]
        slot = self.slots[0]
        slot.holds = None
        return ray.get(slot.runner.export.remote(self.states[best.id]))

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        return {f"slot-{s.index}": list(s.spans) for s in self.slots}

    def peak_training_bytes(self) -> dict[str, int]:
        """From the slots' latest reports: asking the runners would wait behind intervals
        still running when the run stops early."""
        return {f"slot-{s.index}/{w}": b for s in self.slots for w, b in s.peaks.items()}

    def artifacts(self) -> dict[str, Any]:
        """Lineage plot, exploit events, the final table and the winner's schedule."""
        from orchestrator import plots

        trials = [
            {
                "trial": t.id,
                "score": t.score,
                "step": t.step,
                "hyperparameters": t.hyperparameters,
            }
            for t in self.scheduler.trials
        ]
        out: dict[str, Any] = {
            "pbt/exploits.json": json.dumps([asdict(e) for e in self.scheduler.events], indent=1),
            "pbt/trials.json": json.dumps(trials, indent=1),
            "pbt/lineage.png": plots.lineage(
                self.scheduler.events,
                {t.id: t.step for t in self.scheduler.trials},
                f"{self.ctx.config.run_name}: PBT lineage",
            ),
            "pbt/slot_timeline.png": plots.busy_timeline(
                self.timeline(), f"{self.ctx.config.run_name}: trials per slot", math.inf
            ),
        }
        best = self.scheduler.best()
        if best is not None:
            out["pbt/winner_schedule.yaml"] = winner_schedule(self.ctx.config, best.id, self)
        return out


def winner_schedule(run: RunConfig, trial_id: int, strategy: PbtStrategy) -> str:
    """The trial's hyperparameters over its ancestry, with the single-run config that
    replays them: ``unlocked run --replay-schedule FILE``."""
    trial = strategy.scheduler.trials[trial_id]
    inner = inner_run_config(run)
    cfg = inner.model_dump(mode="json")
    cfg["run"]["name"] = f"{run.run_name}-replay-trial-{trial_id}"
    # The trials' step budget stays the run's length (strategies schedule over it, e.g.
    # EGGROLL's sigma); the replay stops where the winner stopped.
    cfg["stop"] = {"max_steps": max(trial.step, inner.stop.max_steps)}
    cfg["eval"]["every"] = run.strategy.interval
    document = {
        "format": SCHEDULE_FORMAT,
        "source": {
            "run": run.run_name,
            "trial": trial_id,
            "metric": run.strategy.metric,
            "score": trial.score,
            "steps_budget": inner.stop.max_steps,
        },
        "stop_at": trial.step,
        "schedule": [{"step": s, "hyperparameters": v} for s, v in trial.schedule],
        "config": cfg,
    }
    return yaml.safe_dump(document, sort_keys=False)
