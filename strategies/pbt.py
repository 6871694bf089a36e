"""Population based training over any other strategy.

Each trial is an inner strategy (backprop, pipeline, EGGROLL, ...) with its own
hyperparameters. The run's placement group is cut into slots, one inner strategy's
workers each, driven by a ``TrialRunner`` actor. Trials are scheduled onto slots
fewest-steps-first; a slot runs one perturbation interval (``interval`` inner steps and an
evaluation), hands back the score, and keeps the resulting state in the object store.
The decisions (rank, exploit, explore) are ``strategies.pbt_scheduler``'s; this module
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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import ray
import torch
import yaml
from pydantic import Field, SerializeAsAny, model_validator
from ray.exceptions import ActorUnavailableError, RayActorError

from orchestrator.errors import ConfigError, RunFailed, UserError
from orchestrator.schedule import SCHEDULE_FORMAT
from strategies.backprop import BackpropConfig
from strategies.base import Metrics, StrategyConfig, check_hyperparameters
from strategies.pbt_scheduler import PbtScheduler
from strategies.registry import register, strategy_registry
from strategies.search_space import Distribution
from workers.trial import TrialRunner

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.context import RunContext

WORKER_LOST = (RayActorError, ActorUnavailableError)


def _inner_union() -> Any:
    """Every strategy registered before this one can be a trial (PBT of PBT cannot)."""
    configs = tuple(cls.Config for kind, cls in strategy_registry().items() if kind != "pbt")
    return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007


class PbtConfig(StrategyConfig):
    kind: Literal["pbt"] = "pbt"
    inner: SerializeAsAny[_inner_union()] = Field(  # type: ignore[valid-type]
        default_factory=BackpropConfig,
        description="The strategy each trial runs, with its own options.",
    )
    population: int = Field(default=4, ge=2, description="Trials.")
    metric: str = Field(default="eval/accuracy", description="What trials are ranked by.")
    mode: Literal["max", "min"] = "max"
    interval: int = Field(
        default=5, gt=0, description="Inner steps per perturbation interval (then rank)."
    )
    quantile_fraction: float = Field(
        default=0.25,
        ge=0.0,
        le=0.5,
        description="Bottom fraction that exploits the top fraction; 0: random search.",
    )
    resample_probability: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Explore: resample instead of perturb."
    )
    perturbation_factors: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.8, 1.2], min_length=1
    )
    synchronous: bool = Field(default=False, description="Rank the whole population at once.")
    burn_in: int = Field(
        default=0, ge=0, description="Inner steps a trial trains before it may be replaced."
    )
    concurrent_trials: int | None = Field(
        default=None, ge=1, description="Slots; default: as many as the cluster fits."
    )
    search_space: dict[str, Distribution] = Field(
        default_factory=lambda: {"lr": Distribution(loguniform=(1e-4, 1e-1))},
        min_length=1,
        description="Mutable hyperparameters: {name: {loguniform: [lo, hi]}, ...}",
    )

    @property
    def requires_data(self) -> bool:
        return getattr(self.inner, "requires_data", True)

    @model_validator(mode="after")
    def _space_is_tunable(self) -> PbtConfig:
        known = self.inner.hyperparameter_names()
        unknown = sorted(set(self.search_space) - set(known))
        if unknown:
            raise ValueError(
                f"search_space: {unknown} are not hyperparameters of strategy "
                f"{self.inner.kind!r}; it has {sorted(known)}"
            )
        if self.concurrent_trials is not None and self.concurrent_trials > self.population:
            raise ValueError(
                f"concurrent_trials {self.concurrent_trials} exceeds population "
                f"{self.population}; at most one slot per trial"
            )
        return self

    def check_against(self, run: RunConfig) -> None:
        check = getattr(self.inner, "check_against", None)
        if check is not None:
            try:
                check(inner_run_config(run))
            except ConfigError as err:
                raise ConfigError(str(err).replace("strategy.", "strategy.inner.", 1)) from None

    def hyperparameter_names(self) -> list[str]:
        return []

    def summary(self) -> str:
        slots = self.concurrent_trials or "as many"
        fit = "" if self.concurrent_trials else " as fit"
        return (
            f"{self.population} {self.inner.kind} trials on {slots} slot(s){fit} of "
            f"{self.slot_workers()} worker(s)"
        )

    def slot_workers(self) -> int:
        return self.inner.num_workers()

    def num_workers(self) -> int:
        """Workers of the slots asked for (auto: one slot, the least that can run)."""
        return (self.concurrent_trials or 1) * self.slot_workers()

    def workers_that_fit(self, available: Mapping[str, float], cpus: float, gpus: float) -> int:
        """With ``concurrent_trials`` unset, as many slots as the free CPUs/GPUs hold."""
        if self.concurrent_trials is not None:
            return self.num_workers()
        per_slot = self.slot_workers()
        slots = int(available.get("CPU", 0) // (per_slot * cpus))
        if gpus > 0:
            slots = min(slots, int(available.get("GPU", 0) // (per_slot * gpus)))
        return max(1, min(self.population, slots)) * per_slot


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


def inner_run_config(run: RunConfig) -> RunConfig:
    """The run config a trial sees: the inner strategy, and the whole run's step budget."""
    pbt = run.strategy
    stop = run.stop.model_copy(
        update={"max_steps": run.stop.max_steps * pbt.interval, "target": None}
    )
    return run.model_copy(update={"strategy": pbt.inner, "stop": stop})


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


@register("pbt")
class PbtStrategy:
    Config = PbtConfig

    def __init__(self, config: PbtConfig) -> None:
        self.config = config
        self.scheduler: PbtScheduler | None = None
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
        if self.scheduler is None:
            self.scheduler = population_scheduler(cfg, ctx.seed)
        self.states = {t.id: initial for t in self.scheduler.trials}
        # Trials whose values differ from those their state carries (new, or just copied
        # and explored): set at their next launch, and only then, so that a strategy's own
        # schedule (EGGROLL's decaying sigma) runs on between explores, as a replay does.
        # A fresh trial that has already run an interval has just copied another.
        self.fresh: set[int] = set(self.states)
        self.inflight: dict[Any, Segment] = {}
        self.books = Books(failures=self.books.failures)

    def _spawn_runner(self, index: int, respawns: int) -> Any:
        per_slot = self.config.slot_workers()
        prefix = f"slot-{index}/" if respawns == 0 else f"slot-{index}/r{respawns}/"
        return self.ctx.spawn(
            TrialRunner,
            self.inner_config,
            self.ctx.dataset,
            self.ctx.placement_group,
            index * per_slot,
            f"{prefix}g{self.ctx.generation}/",
            role="runner" if respawns == 0 else f"runner-r{respawns}",  # names stay unique
            index=index * per_slot,
            num_cpus=0,
            num_gpus=0,
        )

    def state(self) -> dict[str, Any]:
        assert self.scheduler is not None
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
        assert self.scheduler is not None
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
        assert self.scheduler is not None
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
        assert self.scheduler is not None
        return self.scheduler.completed + len(self.inflight)

    def _launch(self) -> None:
        """Give every idle slot a trial, preferring the slot that already holds its state."""
        assert self.scheduler is not None
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
        assert self.scheduler is not None
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
            self.pending[f"trial-{event.trial}/exploit/donor"] = float(event.donor)
            self._record(event.trial, {}, event.step)

    def _record(self, trial_id: int, metrics: Metrics, step: int) -> None:
        assert self.scheduler is not None
        prefix = f"trial-{trial_id}/"
        self.pending.update({prefix + k: float(v) for k, v in metrics.items()})
        self.pending[prefix + "inner_step"] = float(step)
        for name, value in self.scheduler.trials[trial_id].hyperparameters.items():
            self.pending[f"{prefix}hp/{name}"] = hyperparameter_number(self.config, name, value)

    def _lose(self, segment: Segment, err: BaseException) -> None:
        """A slot's runner or one of its workers died: rebuild the slot; the trial
        runs the interval again from its last state."""
        assert self.scheduler is not None
        self.books.failures += 1
        limit = self.ctx.config.resources.max_failures
        if self.books.failures > limit:
            raise RunFailed(
                f"PBT: a slot was lost {self.books.failures} times "
                f"(resources.max_failures={limit}); last error: {err}"
            ) from err
        self.scheduler.release(segment.trial)
        slot = segment.slot
        ray.kill(slot.runner, no_restart=True)  # its workers go with it (owned actors)
        slot.respawns += 1
        slot.runner = self._spawn_runner(slot.index, slot.respawns)
        slot.holds = None

    def _summary(self) -> Metrics:
        assert self.scheduler is not None
        scores = self.scheduler.scores()
        books = self.books
        capacity = len(self.slots) * max(1e-9, time.time() - books.started)
        out = {
            "pbt/segments": float(self.scheduler.completed),
            "pbt/exploits": float(len(self.scheduler.events)),
            "pbt/busy_fraction": books.busy_s / capacity,
            "pbt/exploit_overhead": books.exploit_s / capacity,
            "pbt/switch_overhead": books.switch_s / capacity,
            "pbt/capture_overhead": books.capture_s / capacity,
            "pbt/slot_failures": float(books.failures),
        }
        if scores:
            out["pbt/best_score"] = self.scheduler.best().score  # type: ignore[union-attr]
            out["pbt/median_score"] = statistics.median(scores)
        return out

    def _quiesce(self) -> None:
        """Let in-flight intervals end and drop them (a run stopped early): the slots are
        then free and alive, and every trial's state is its last one accounted for."""
        assert self.scheduler is not None
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
        assert self.scheduler is not None
        best = self.scheduler.best()
        if best is None:
            return {}
        metrics = {k: v for k, v in self.latest[best.id].items() if k.startswith("eval/")}
        return {**metrics, "pbt/best_trial": float(best.id)}

    def hyperparameters(self) -> dict[str, float]:
        return {}

    def set_hyperparameters(self, values: dict[str, float]) -> None:
        check_hyperparameters(values, {})

    def export_model(self) -> torch.nn.Module:
        """The best trial's network."""
        assert self.scheduler is not None
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

        assert self.scheduler is not None
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
    assert strategy.scheduler is not None
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
