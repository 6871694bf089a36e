"""The controller: the only place that knows about placement, restarts, checkpoints and
tracking. It reads top to bottom as the life of a run:

    resolve data -> connect Ray -> reserve workers -> start tracking -> build strategy
    -> loop { step; log; evaluate; checkpoint; stop? }  (on a lost worker: rebuild, restore;
       on a NaN/inf loss: stop, or roll back with the learning rate halved)
    -> final evaluation, checkpoint, model and plots -> release everything

``Controller.run`` owns what must be released (signal handlers, Ray, the placement group,
the MLflow run); ``ActiveRun`` is one run in progress, every part of it built before
training starts, and is what callbacks receive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import ray
from pyarrow import fs as pafs
from ray.util.placement_group import remove_placement_group

from orchestrator import plots
from orchestrator.callbacks import Callback
from orchestrator.checkpoint import CheckpointInfo, CheckpointStore
from orchestrator.cluster import (
    await_replacement,
    check_cuda,
    connect,
    locate_workers,
    probe,
    reserve,
)
from orchestrator.config import EngineConfig, RunConfig
from orchestrator.context import RunContext
from orchestrator.data.source import check_dataset, resolve_dataset
from orchestrator.data.stream import BatchStream
from orchestrator.errors import Terminated, UserError
from orchestrator.locations import ephemeral_locations, job_submission_id
from orchestrator.nonfinite import (
    EVENTS_METRIC,
    LR_FACTOR,
    NonFiniteStep,
    NonFiniteStop,
    decide,
    learning_rates,
    nonfinite_metrics,
    stop_message,
)
from orchestrator.progress import StepProgress
from orchestrator.recovery import WORKER_LOST, FailureBudget, build_strategy
from orchestrator.results import RunResult, WorkerPlacement
from orchestrator.schedule import HyperparameterSchedule
from orchestrator.thinned import ThinnedSteps
from orchestrator.tracking import Tracker, buffer_folder, default_tracking_uri
from orchestrator.tracking_probe import check_tracking
from strategies.base import Metrics, Strategy

log = logging.getLogger("unlocked")

Restored = tuple[CheckpointInfo, dict[str, Any]]
"""A checkpoint and the state loaded from it."""


def config_digest(config: RunConfig) -> str:
    """What a checkpoint's state depends on: the strategy, model and engine sections (an
    engine's optimizer state loads only into the same engine)."""
    dumped = config.model_dump(mode="json")
    sections = {k: dumped[k] for k in ("strategy", "model")}
    if config.engine != EngineConfig():  # digests of runs saved before engines still match
        sections["engine"] = dumped["engine"]
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:16]


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


HISTORY_STEPS = 10_000
"""Steps of ``RunResult.history`` kept in full; a longer run keeps every 2nd, 4th, ...
(MLflow has them all)."""
SHOWN_ATTEMPTS = 10
"""Attempt folders a ``--resume ATTEMPT`` error lists (the newest): enough to pick from."""


def open_run_store(
    config: RunConfig, resume: bool | str
) -> tuple[CheckpointStore, Restored | None]:
    """Each fresh run gets its own attempt directory (created by its first checkpoint);
    ``resume=True`` takes the newest one that holds a complete checkpoint, so running the
    same config twice never mixes states; ``resume="ATTEMPT"`` takes that attempt folder
    and no other, so the command an interrupted run prints continues that very run even
    after the same config started again. Either loads the attempt's newest intact
    checkpoint, passing over damaged ones."""
    base = f"{config.checkpoint.root.rstrip('/')}/{config.run_name}"
    keep = config.checkpoint.keep
    if isinstance(resume, str):  # before truthiness: an empty name is a mistake, not False
        candidates = [_pinned_attempt(config, base, resume)]
    elif resume:
        candidates = list(reversed(_attempts(base)))
    else:
        attempt = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"
        return CheckpointStore(f"{base}/{attempt}", keep), None
    for attempt in candidates:
        store = CheckpointStore(f"{base}/{attempt}", keep)
        if not store.steps():
            continue
        restored = store.load_newest_intact()
        if restored is None:
            raise UserError(
                f"--resume: every checkpoint of run {config.run_name!r} in {store.uri} is "
                "damaged (the lines above name each one and what is wrong); restore that "
                "folder from a copy, or run without --resume to start the run again in a "
                "new folder"
            )
        return store, restored
    if isinstance(resume, str):
        raise UserError(
            f"--resume {resume}: attempt {resume} of run {config.run_name!r} ({base}/{resume}) "
            "holds no complete checkpoint; give another attempt, or --resume alone for the "
            "newest attempt that holds one"
        )
    raise UserError(
        f"--resume: run {config.run_name!r} has no complete checkpoint under {base}; "
        "run without --resume to start it, or set run.name to the run you mean"
    )


def _attempts(base: str) -> list[str]:
    """The attempt folders of a run, oldest first (their names sort by start time)."""
    filesystem, path = _filesystem(base)
    entries = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)


def _pinned_attempt(config: RunConfig, base: str, attempt: str) -> str:
    """``attempt`` if it is one of the run's attempt folders; else a UserError naming those
    that exist (a name with a ``/``, ``..`` or nothing in it never is one)."""
    attempts = _attempts(base)
    if attempt in attempts:
        return attempt
    if not attempts:
        known = f"run {config.run_name!r} has no attempt under {base}"
    else:
        newest = attempts[-SHOWN_ATTEMPTS:]
        more = (
            f" ({len(attempts) - len(newest)} older not shown)"
            if len(newest) < len(attempts)
            else ""
        )
        known = (
            f"the attempts of run {config.run_name!r} under {base} are {', '.join(newest)}{more}"
        )
    raise UserError(
        f"--resume {attempt!r}: no such attempt; {known}. Give one of them (the last part of "
        "the 'checkpoints:' path a run prints), or --resume alone for the newest"
    )


def warn_if_job_loses_output(config: RunConfig) -> None:
    """A submitted job runs in a temporary copy of its working dir: say what would vanish."""
    if job_submission_id() is None:
        return
    locations = {"checkpoint.root": config.checkpoint.root}
    if config.tracking.enabled:
        locations["tracking.uri"] = default_tracking_uri(config.tracking.uri)
    if config.data is not None:
        locations["data.root"] = config.data.root
    lost = ephemeral_locations(locations, Path.cwd())
    if lost:
        log.warning(
            "this Ray job runs in %s, a temporary copy deleted when the job ends, and %s "
            "lie in it; set MLFLOW_TRACKING_URI, UNLOCKED_CHECKPOINT_ROOT and UNLOCKED_DATA_ROOT "
            "on the cluster's nodes (deploy/runtime_env.yaml passes them on), or --set them",
            Path.cwd(),
            ", ".join(lost),
        )


class Controller:
    def __init__(
        self,
        config: RunConfig,
        resume: bool | str = False,
        callbacks: Sequence[Callback] = (),
        schedule: HyperparameterSchedule | None = None,
    ) -> None:
        self.config = config
        self.resume = resume
        self.callbacks = list(callbacks)
        self.schedule = schedule
        self.stop_signal: str | None = None

    def run(self) -> RunResult:
        config, res = self.config, self.config.resources
        # Every check that can fail on the user's input runs before anything starts.
        warn_if_job_loses_output(config)
        check_tracking(config)  # an unreachable tracking.uri: one message in ~2 s
        counted = check_dataset(config.data) if config.data is not None else None
        if res.address:
            probe(res.address)
        digest = config_digest(config)
        store, restored = open_run_store(config, self.resume)
        resume_from, saved = restored if restored is not None else (None, None)
        meta = resume_from.meta if resume_from else {}
        if meta.get("config_digest", digest) != digest:
            raise UserError(
                f"--resume: the checkpoint in {store.uri} was written with a different "
                "strategy, model or engine section; resume with the config that run started "
                "with, or start a fresh run without --resume"
            )
        dataset = resolve_dataset(config.data, counted) if config.data is not None else None
        if dataset is not None:  # a batch larger than the data fails here, not in a worker
            BatchStream(dataset, "train", config.data.batch_size, config.run.seed)
            config.strategy.check_with_data(config, dataset)  # before Ray and MLflow start
        address, started_ray = connect(res, config.strategy.num_workers() * res.cpus_per_worker)
        workers = config.strategy.workers_that_fit(
            ray.available_resources(), res.cpus_per_worker, res.gpus_per_worker
        )
        self.stop_signal = None
        previous = self._install_signal_handlers()
        group = None
        tracker = None
        ctx = None
        run = None
        try:
            bundle = {"CPU": res.cpus_per_worker}
            if res.gpus_per_worker:
                bundle["GPU"] = res.gpus_per_worker
            group = reserve(
                [dict(bundle) for _ in range(workers)],
                res.placement_strategy,
                res.placement_timeout_s,
            )
            if res.gpus_per_worker:
                check_cuda(group, res.gpus_per_worker)
            ctx = RunContext(config, dataset, group, FailureBudget(res.max_failures))
            if config.tracking.enabled:
                tracker = Tracker(config, address, buffer=buffer_folder(store.uri))
                tracker.start(meta.get("mlflow_run_id"))
            run = ActiveRun(self, ctx, store, tracker, digest, saved, resume_from, meta)
            return run.train()
        except BaseException as err:
            if tracker is not None:
                tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            self._restore_signal_handlers(previous)
            if ctx is not None:
                if run is not None:
                    run.strategy.close()
                ctx.kill_workers()
            if group is not None:
                remove_placement_group(group)
            if started_ray:
                ray.shutdown()

    # -- signals --------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGINT/SIGTERM finish the current step, checkpoint and stop; a second one aborts."""
        previous: dict[int, Any] = {}

        def handler(signum: int, _frame: Any) -> None:
            if self.stop_signal:
                raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
            self.stop_signal = signal.Signals(signum).name
            log.warning("%s: stopping after this step and saving a checkpoint", self.stop_signal)

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a notebook's worker thread): none
            return {}
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)


class ActiveRun:
    """One run in progress: its workers, checkpoints and MLflow record all exist. Callbacks
    receive it; ``config``, ``strategy``, ``step`` and ``failures`` are theirs to read."""

    def __init__(
        self,
        controller: Controller,
        ctx: RunContext,
        store: CheckpointStore,
        tracker: Tracker | None,
        digest: str,
        saved: dict[str, Any] | None,
        resume_from: CheckpointInfo | None,
        meta: dict[str, Any],
    ) -> None:
        self.controller = controller
        self.config = controller.config
        self.ctx = ctx
        self.store = store
        self.tracker = tracker
        self.digest = digest
        self.callbacks = controller.callbacks
        self.schedule = controller.schedule
        ctx.failures.listener = self._notify_failure
        self.step = resume_from.step if resume_from else 0
        self.saved_step: int | None = resume_from.step if resume_from else None
        """The newest intact checkpoint's step (a damaged newer one does not count)."""
        self.elapsed_before = float(meta.get("elapsed_s", 0.0))
        self.started = time.monotonic()
        self.applied: dict[str, Any] | None = None
        self.nonfinite, self.max_rollbacks = (
            self.config.run.nonfinite,
            self.config.run.max_rollbacks,
        )
        # A resumed run goes on with the rollbacks it has left and the rates they halved.
        self.nonfinite_events = int(meta.get("nonfinite_events", 0))
        self.rollbacks = int(meta.get("rollbacks", 0))
        self.lr_factor = float(meta.get("lr_factor", 1.0))
        """What rollbacks have multiplied the learning rates by (a replayed schedule's too);
        each checkpoint records the factor its rates were written with."""
        self.history: ThinnedSteps[Metrics] = ThinnedSteps(HISTORY_STEPS)
        """Each step's metrics as it last ran: a step abandoned by going back to a
        checkpoint is dropped, and its replay takes its place."""
        self.strategy: Strategy = build_strategy(self.config, ctx, saved)
        self.placement = self._record_placement()

    @property
    def failures(self) -> int:
        return self.ctx.failures.failures

    @property
    def checkpoint_dir(self) -> str:
        return self.store.uri

    def train(self) -> RunResult:
        config = self.config
        last = config.stop.max_steps
        if self.schedule is not None and self.schedule.stop_at is not None:
            last = min(last, self.schedule.stop_at)  # where the replayed trial stopped
        metrics: Metrics = {}
        stopped_by = "max_steps"
        # Once, unless the final evaluation is not finite and the run rolls back, or a
        # worker is lost in the final evaluation or checkpoint and the run goes back to
        # its newest checkpoint (which may be the last step: then no step is replayed and
        # the last step's metrics and reason stand).
        while True:
            with StepProgress(last, self.strategy.headline_metrics(), start=self.step) as bar:
                ran, why = self._train_steps(last, bar)
            if ran:
                metrics, stopped_by = ran, why
            interrupted = stopped_by.startswith("SIG")
            try:
                peaks = self.strategy.peak_training_bytes()
                metrics = self._finish(metrics, interrupted)
                break
            except NonFiniteStep as event:
                self._on_nonfinite(event)
            except WORKER_LOST as err:
                self._recover(err)
        published = self._publish(metrics, peaks) if self.tracker is not None else []
        if self.tracker is not None:
            self.tracker.finish("KILLED" if interrupted else "FINISHED")
        tracker = self.tracker
        result = RunResult(
            run_name=config.run_name,
            step=self.step,
            metrics=metrics,
            checkpoint_dir=self.store.uri,
            mlflow_run_id=tracker.run_id if tracker else None,
            tracking_uri=tracker.uri if tracker else None,
            ui_url=tracker.ui_hint() if tracker else None,
            failures=self.failures,
            stopped_by=stopped_by,
            peak_training_bytes=peaks,
            history=self.history.items(),
            artifacts=published,
            placement=self.placement,
        )
        for callback in self.callbacks:
            callback.on_finish(self, result)
        return result

    def _train_steps(self, last: int, progress: StepProgress) -> tuple[Metrics, str]:
        """Steps until ``last`` or a stop condition: the last step's metrics and what
        stopped it (see ``RunResult.stopped_by``)."""
        stop = self.config.stop
        metrics: Metrics = {}
        stopped_by = "max_steps"
        while self.step < last and not self.controller.stop_signal:
            try:
                metrics = self._one_step()
            except WORKER_LOST as err:
                self._recover(err)
                continue
            except NonFiniteStep as event:
                self._on_nonfinite(event)
                continue
            self.history.put(self.step, metrics)
            progress.update(self.step, metrics)
            for callback in self.callbacks:
                callback.on_step_end(self, self.step, metrics)
            if stop.target is not None and stop.target.reached(metrics):
                stopped_by = "target"
            elif stop.max_wall_s is not None and self._elapsed() >= stop.max_wall_s:
                stopped_by = "max_wall_s"
            else:
                continue
            break
        return metrics, self.controller.stop_signal or stopped_by

    def _apply_schedule(self) -> None:
        """A replayed schedule: the values due at this step, set when they change."""
        if self.schedule is None:
            return
        values = self.schedule.at(self.step)
        if values != self.applied:
            self.strategy.set_hyperparameters({**values, **learning_rates(values, self.lr_factor)})
            self.applied = values

    def _one_step(self) -> Metrics:
        """Step, log, evaluate and checkpoint as one unit: a lost worker anywhere in it
        sends the run back to the last checkpoint. A step whose loss, fitness or norm is
        not finite is logged as it is, and raises ``NonFiniteStep`` before it can be
        checkpointed."""
        self._apply_schedule()
        metrics = self.strategy.step()
        step = self.step + 1
        if step % self.config.eval.every == 0:
            metrics.update(self.strategy.evaluate())
        if self.tracker is not None:
            self.tracker.log(step, metrics)
        bad = nonfinite_metrics(metrics, self.strategy.headline_metrics())
        if bad:
            raise NonFiniteStep(step, bad)
        if step % self.config.checkpoint.every == 0:
            self._checkpoint(step)
        self.step = step
        return metrics

    def _elapsed(self) -> float:
        """Training wall time of the whole run, across resumes (for stop.max_wall_s)."""
        return self.elapsed_before + time.monotonic() - self.started

    def _checkpoint(self, step: int) -> None:
        meta: dict[str, Any] = {
            "strategy": self.config.strategy.kind,
            "config_digest": self.digest,
            "elapsed_s": self._elapsed(),
            "rollbacks": self.rollbacks,
            "lr_factor": self.lr_factor,
            "nonfinite_events": self.nonfinite_events,
        }
        if self.tracker is not None:
            meta["mlflow_run_id"] = self.tracker.run_id
        info = self.store.save(step, self.strategy.state(), meta)
        self.saved_step = step
        for callback in self.callbacks:
            callback.on_checkpoint(self, step, info.path)

    def _notify_failure(self, err: BaseException, failures: int) -> None:
        for callback in self.callbacks:
            callback.on_failure(self, err, failures)

    def _recover(self, err: BaseException) -> None:
        """After a lost worker: back to the newest intact checkpoint (or the initial
        state), charged to the failure budget."""
        restored = self.store.load_newest_intact()
        where = f"step {self.step + 1}"
        self.ctx.failures.charge(err, where, f"rebuilding workers and restoring {_named(restored)}")
        self._restart(restored, where)
        self._rescale_rates(restored)
        if self.tracker is not None:
            failures = float(self.failures)
            self.tracker.log(self.step, {"system/failures": failures}, force=True)
            self.tracker.set_tag("failures", str(self.failures))

    def _on_nonfinite(self, event: NonFiniteStep) -> None:
        """Count and log the event; stop the run (``NonFiniteStop``, its checkpoints kept),
        or roll back to the newest intact checkpoint with the factor on every learning
        rate halved from the one the diverging step ran at (so a second rollback to the
        same checkpoint halves it again)."""
        self.nonfinite_events += 1
        if self.tracker is not None:
            events = {EVENTS_METRIC: float(self.nonfinite_events)}
            self.tracker.log(event.step, events, force=True)
        if decide(self.nonfinite, self.rollbacks, self.max_rollbacks) == "stop":
            self._stop(event)
        restored = self.store.load_newest_intact()
        if restored is not None and restored[0].step >= event.step:
            # A final evaluation of a checkpointed step: going back replays no step, so the
            # halved rate could never act and every rollback would see the same figures.
            self._stop(event)
        self.rollbacks += 1
        log.warning(
            "not finite at %s; rolling back to %s with the learning rate halved (rollback %d "
            "of run.max_rollbacks=%d)",
            event,
            _named(restored),
            self.rollbacks,
            self.max_rollbacks,
        )
        self._restart(restored, f"step {event.step}")
        self.lr_factor *= LR_FACTOR
        self._rescale_rates(restored)

    def _rescale_rates(self, restored: Restored | None) -> None:
        """After going back to ``restored`` (its meta records the factor its rates were
        written with; the initial state's is 1): the run's factor now on its rates."""
        written = float(restored[0].meta.get("lr_factor", 1.0)) if restored else 1.0
        rescale_learning_rates(self.strategy, written, self.lr_factor)

    def _stop(self, event: NonFiniteStep) -> NoReturn:
        step = self.saved_step
        kept = None if step is None else f"{self.store.uri} (newest: step {step})"
        log.error("not finite at %s; stopping (run.nonfinite: %s)", event, self.nonfinite)
        raise NonFiniteStop(
            stop_message(event, self.nonfinite, self.rollbacks, self.max_rollbacks, kept)
        )

    def _restart(self, restored: Restored | None, where: str) -> None:
        """Tear every worker down, build the strategy anew and restore ``restored`` (or
        the initial state): the same path that built it, so no state of the abandoned
        steps survives in a worker or in flight."""
        self.strategy.close()
        lost = self.ctx.kill_workers()
        await_replacement(
            self.ctx.placement_group, lost, self.config.resources.placement_timeout_s, where
        )
        info, saved = restored if restored is not None else (None, None)
        self.strategy = build_strategy(self.config, self.ctx, saved)
        self.placement = self._record_placement()
        self.applied = None
        self.step = info.step if info is not None else 0
        self.saved_step = info.step if info is not None else None
        self.history.truncate(self.step)

    def _record_placement(self) -> dict[str, WorkerPlacement]:
        """Which node each worker landed on, kept in MLflow's ``placement.json``
        (rewritten when a recovery moves workers) and logged (at DEBUG on a one-node Ray,
        where there was nothing to choose)."""
        placement = locate_workers(self.ctx.placement_group, self.ctx.bundles)
        several = sum(node["Alive"] for node in ray.nodes()) > 1
        log.log(
            logging.INFO if several else logging.DEBUG,
            "workers placed (%s): %s",
            self.config.resources.placement_strategy,
            ", ".join(f"{w} on {p.node_ip} node {p.node_id[:8]}" for w, p in placement.items()),
        )
        if self.tracker is not None:
            record = {w: dataclasses.asdict(p) for w, p in placement.items()}
            self.tracker.log_text(json.dumps(record, indent=1), "placement.json")
        return placement

    def _finish(self, metrics: Metrics, interrupted: bool) -> Metrics:
        """The final evaluation (unless the last step had one) and checkpoint."""
        if not interrupted and self.step % self.config.eval.every != 0:
            final = self.strategy.evaluate()
            bad = nonfinite_metrics(final, self.strategy.headline_metrics())
            if bad:  # not logged: after a rollback the final evaluation is logged again
                raise NonFiniteStep(self.step, bad)
            metrics = {**metrics, **final}
            if self.tracker is not None:
                self.tracker.log(self.step, final, force=True)
        if self.saved_step != self.step:  # never rewrite a good checkpoint
            self._checkpoint(self.step)
        return metrics

    def _publish(self, metrics: Metrics, peaks: dict[str, int]) -> list[str]:
        """Final model, memory figures and plots as MLflow artifacts; the strategy's own
        records' paths are returned."""
        tracker = self.tracker
        assert tracker is not None
        tracker.log(
            self.step,
            {f"{w}/system/peak_training_mb": b / 2**20 for w, b in peaks.items()},
            force=True,
        )
        while True:
            try:
                return self._publish_artifacts(metrics)
            except WORKER_LOST as err:
                # the newest checkpoint is this step's (``_finish`` wrote it): the rebuilt
                # workers hold the final model and nothing is trained or logged again
                self._recover(err)

    def _publish_artifacts(self, metrics: Metrics) -> list[str]:
        tracker, strategy, config = self.tracker, self.strategy, self.config
        assert tracker is not None
        dataset = self.ctx.dataset
        spec = {
            "model": config.model.model_dump(mode="json"),
            "strategy": config.strategy.model_dump(mode="json"),
            "num_features": dataset.num_features if dataset else None,
            "num_classes": dataset.num_classes if dataset else None,
            "input": dataclasses.asdict(dataset.input) if dataset else None,
            "final_metrics": {k: float(v) for k, v in metrics.items() if k.startswith("eval/")},
        }
        model = strategy.export_model()
        if model is not None:
            tracker.log_model(model, spec)
        curves = {key: tracker.metric_history(key) for key in tracker.metric_keys()}
        tracker.log_figure(
            plots.learning_curves(curves, config.run_name), "plots/learning_curves.png"
        )
        tracker.log_figure(
            plots.busy_timeline(strategy.timeline(), f"{config.run_name}: busy time per worker"),
            "plots/worker_timeline.png",
        )
        records = strategy.artifacts()
        for path, content in records.items():
            if isinstance(content, str):
                tracker.log_text(content, path)
            else:
                tracker.log_figure(content, path)
        return list(records)


def rescale_learning_rates(strategy: Strategy, written: float, factor: float) -> None:
    """Set ``strategy``'s learning rates, restored from a state written under the factor
    ``written``, to what they are under ``factor``.

    The restored rates are the base, not the rates of the step that diverged: a strategy
    whose rate follows a schedule (EGGROLL's ``lr_schedule``) reports the rate of its
    own step, and setting half the diverged step's rate at the restored step would also
    scale it by the schedule's ratio between the two steps."""
    if written != factor:
        strategy.set_hyperparameters(learning_rates(strategy.hyperparameters(), factor / written))


def _named(restored: Restored | None) -> str:
    return f"checkpoint step {restored[0].step}" if restored else "the initial state"
