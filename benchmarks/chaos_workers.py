"""The worker half of the chaos suite: lost workers, a killed driver, a lost node.

Each scenario trains a fault-free reference and then the same config and seed with
faults, and reports a ``FaultOutcome``: how many faults were injected and recovered (a
recovered fault is one the controller counted as a failure and after which the run went
on to its last step), how many MLflow steps the faulted run logged twice or never (every
metric of the parent and of every nested run, against the steps the reference logged),
and the largest difference of a final metric that does not measure time.

Workers are killed from a ``Callback`` (``on_step_end``) at steps a pure, seeded
schedule picks, each kill's victim drawn by a seeded RNG from the run's live actors
(``ray.util.list_named_actors``: a PBT trial's inner workers and its slot runners too).
A step's victim is killed once, even when recovery replays that step.
"""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
import yaml
from mlflow.tracking import MlflowClient

import unlocked
from benchmarks.chaos_outcome import FaultOutcome, duplicated_and_missing, metric_delta
from strategies.moe_hc.pde.configs import HeatConfig

STRATEGIES = ("pipeline", "backprop", "eggroll", "pbt", "moe_hc")
REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "chaos"

# Figures that measure time or throughput differ between any two runs, faults or not.
TIMING = re.compile(r"(_s|per_s|busy_fraction|overhead|_mb)$")


def kill_steps(seed: int, max_steps: int, kills: int) -> list[int]:
    """``kills`` distinct steps in 1..max_steps, drawn by ``seed``, in order. The last
    step is fair game: its kill lands in the final evaluation and checkpoint, which
    recover as a step does."""
    if not 0 <= kills <= max_steps:
        raise ValueError(f"kills: {kills} must be in 0..{max_steps} for {max_steps} steps")
    return sorted(random.Random(seed).sample(range(1, max_steps + 1), kills))


def comparable_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The final metrics two runs of one seed must share: training and held-out figures,
    not timings, throughput, memory or the failure counters (``system/``)."""
    return {
        key: value
        for key, value in metrics.items()
        if ("train/" in key or "eval/" in key) and not TIMING.search(key)
    }


def run_actors(run_name: str) -> list[str]:
    """The live named actors of run ``run_name`` (workers, PBT runners and their trials')."""
    return sorted(n for n in ray.util.list_named_actors() if n.startswith(f"{run_name}/"))


class SeededKiller(unlocked.Callback):
    """Kills one live worker of the run after each scheduled step (once per step, though
    recovery replays it), the victim drawn by a seeded RNG; counts the failures the
    controller reports."""

    def __init__(self, steps: Iterable[int], seed: int) -> None:
        self.due = set(steps)
        self.rng = random.Random(seed)
        self.victims: list[str] = []
        self.failures = 0

    def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        if step not in self.due:
            return
        self.due.discard(step)
        names = run_actors(run.config.run_name)
        victim = names[self.rng.randrange(len(names))]
        ray.kill(ray.get_actor(victim), no_restart=True)
        self.victims.append(victim)

    def on_failure(self, run: Any, error: BaseException, failures: int) -> None:
        self.failures = failures


# -- small configs, one per strategy ---------------------------------------------------
def tracking_section(workdir: Path) -> dict[str, Any]:
    return {
        "uri": f"sqlite:///{workdir / 'mlruns.db'}",
        "experiment": EXPERIMENT,
        "system_metrics": False,
    }


def strategy_config(kind: str, workdir: Path, name: str, seed: int) -> dict[str, Any]:
    """A run of strategy ``kind`` small enough to train in seconds on 2 cores, with a
    checkpoint every 2 steps so a kill replays at most one step."""
    data = {"dataset": "digits", "batch_size": 64, "root": str(workdir / "datasets")}
    sections: dict[str, Any] = {
        "pipeline": {
            "strategy": {
                "kind": "pipeline",
                "blocks": 3,
                "aux_head": "linear",
                "batches_per_step": 4,
                "max_in_flight": 2,
                "optimizer": {"kind": "adam", "lr": 0.002},
            },
            "model": {"hidden": [32, 32, 32]},
            "data": data,
        },
        "backprop": {
            "strategy": {"kind": "backprop", "batches_per_step": 4, "optimizer": {"lr": 0.002}},
            "model": {"hidden": [32, 32]},
            "data": data,
        },
        "eggroll": {
            "strategy": {
                "kind": "eggroll",
                "population": 32,
                "rank": 1,
                "sigma": 0.1,
                "optimizer": {"kind": "adam", "lr": 0.05},
                "workers": 2,
                "checksum_every": 2,
                "task": {
                    "kind": "gym",
                    "env": "CartPole-v1",
                    "hidden": [8],
                    "max_episode_steps": 50,
                    "eval_episodes": 2,
                },
            },
        },
        "pbt": {
            "strategy": {
                "kind": "pbt",
                "population": 2,
                "interval": 1,
                "concurrent_trials": 2,
                "synchronous": True,  # decisions independent of timing: comparable runs
                "quantile_fraction": 0.5,
                "search_space": {"lr": {"loguniform": [1e-3, 0.1]}},
                "inner": {"kind": "backprop", "batches_per_step": 2, "optimizer": {"lr": 0.01}},
            },
            "model": {"hidden": [16, 16]},
            "data": data,
        },
        "moe_hc": {
            "strategy": {
                "kind": "moe_hc",
                "problem": HeatConfig(
                    root=str(workdir / "pde"), train_instances=8, test_instances=2, nx=16, nt=7
                ).model_dump(),
                "experts": {"x": 2},
                "basis": {"functions": 8, "width": 16, "depth": 2},
                "constraint_points": 64,
                "boundary_points": 8,
                "data_points": 32,
                "batches_per_step": 1,
            },
        },
    }
    if kind not in sections:
        raise ValueError(f"strategy: {kind!r} is not one of {STRATEGIES}")
    return {
        "run": {"name": name, "seed": seed},
        **sections[kind],
        "resources": {"max_failures": 10},
        "tracking": tracking_section(workdir),
        "checkpoint": {"root": str(workdir / "ckpt"), "every": 2, "keep": 2},
        "stop": {"max_steps": 6},
        "eval": {"every": 3},
    }


# -- what MLflow holds -------------------------------------------------------------------
def logged_steps(tracking_uri: str, run_id: str) -> dict[str, list[int]]:
    """Every step of every metric the run and its nested runs logged, keyed
    ``<nested run>/<metric>`` (a nested run rebuilt after a loss adds to its name's
    steps). The failure counters (``system/``) are logged at the step a recovery went
    back to, once per loss, so they are left out."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    steps: dict[str, list[int]] = {}
    for run, prefix in [(parent, ""), *((c, c.info.run_name + "/") for c in children)]:
        for key in run.data.metrics:
            if key.startswith("system/"):
                continue
            history = client.get_metric_history(run.info.run_id, key)
            steps.setdefault(prefix + key, []).extend(m.step for m in history)
    return steps


def compare_logs(reference: dict[str, list[int]], faulted: dict[str, list[int]]) -> tuple[int, int]:
    """Steps the faulted run logged twice, and steps the reference logged that it never
    did, summed over every metric."""
    duplicated = missing = 0
    for key, expected in reference.items():
        dup, miss = duplicated_and_missing(faulted.get(key, []), sorted(set(expected)))
        duplicated, missing = duplicated + dup, missing + miss
    for key, steps in faulted.items():
        if key not in reference:
            duplicated += sum(n - 1 for n in Counter(steps).values())
    return duplicated, missing


# -- scenarios ---------------------------------------------------------------------------
def seeded_kills(kind: str, workdir: Path, seed: int = 0, kills: int = 2) -> FaultOutcome:
    """A fault-free run of ``kind``, then the same run with ``kills`` workers killed at
    seeded steps: same final metrics, every MLflow step logged once."""
    reference = unlocked.run(strategy_config(kind, workdir, f"{kind}-reference", seed))
    started = time.monotonic()
    raw = strategy_config(kind, workdir, f"{kind}-kills-{seed}", seed)
    killer = SeededKiller(kill_steps(seed, raw["stop"]["max_steps"], kills), seed)
    faulted = unlocked.run(raw, callbacks=[killer])
    seconds = time.monotonic() - started
    finished = faulted.step == raw["stop"]["max_steps"]
    duplicated, missing = compare_logs(
        logged_steps(reference.tracking_uri, reference.mlflow_run_id),
        logged_steps(faulted.tracking_uri, faulted.mlflow_run_id),
    )
    return FaultOutcome(
        scenario="worker kills",
        strategy=kind,
        faults_injected=len(killer.victims),
        faults_recovered=min(len(killer.victims), killer.failures) if finished else 0,
        steps_duplicated=duplicated,
        steps_missing=missing,
        metric_delta=metric_delta(
            comparable_metrics(reference.metrics), comparable_metrics(faulted.metrics)
        ),
        seconds=seconds,
        detail="killed " + ", ".join(v.split("/", 1)[1] for v in killer.victims),
    )


def _cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    """`python -m orchestrator ...` in its own process group (killed with its Ray)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, not the benchmark's
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path_glob: Callable[[], list[Path]], process: subprocess.Popen[str], limit: float):
    deadline = time.monotonic() + limit
    while not path_glob():
        if process.poll() is not None:
            raise RuntimeError(f"the run ended before its checkpoint: {process.stdout.read()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no checkpoint within {limit:.0f} s")
        time.sleep(0.2)


def mlflow_run_of(tracking_uri: str, name: str) -> Any:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'"
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if len(parents) != 1:
        raise RuntimeError(f"expected one MLflow run named {name!r}, found {len(parents)}")
    return parents[0]


def driver_kill_then_resume(workdir: Path, seed: int = 0, max_steps: int = 12) -> FaultOutcome:
    """`unlocked run` SIGKILLed with its whole process group after its step-4 checkpoint,
    then `--resume`: it must end on the reference's metrics, each step logged once."""
    raw = strategy_config("pipeline", workdir, "driver-reference", seed)
    raw["stop"]["max_steps"] = max_steps
    reference = unlocked.run(raw)
    started = time.monotonic()
    raw["run"]["name"] = name = f"driver-kill-{seed}"
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    first = _cli(["run", str(config)], workdir)
    try:
        _wait_for(
            lambda: list((workdir / "ckpt" / name).glob("*/step-000000004/manifest.json")),
            first,
            limit=300,
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    second = _cli(["run", str(config), "--resume"], workdir)
    out, _ = second.communicate(timeout=600)
    seconds = time.monotonic() - started
    faulted = mlflow_run_of(reference.tracking_uri, name)
    expected = MlflowClient(reference.tracking_uri).get_run(reference.mlflow_run_id)
    duplicated, missing = compare_logs(
        logged_steps(reference.tracking_uri, reference.mlflow_run_id),
        logged_steps(reference.tracking_uri, faulted.info.run_id),
    )
    resumed = second.returncode == 0 and f"stopped at step {max_steps}" in out
    return FaultOutcome(
        scenario="driver SIGKILL, --resume",
        strategy="pipeline",
        faults_injected=1,
        faults_recovered=int(resumed),
        steps_duplicated=duplicated,
        steps_missing=missing,
        metric_delta=metric_delta(
            comparable_metrics(expected.data.metrics), comparable_metrics(faulted.data.metrics)
        ),
        seconds=seconds,
        detail="" if resumed else f"--resume exited {second.returncode}: {out[-400:]}",
    )


def node_lost(workdir: Path, seed: int = 0) -> FaultOutcome:
    """A pipeline spread over a head and two worker nodes (tests/multinode.py's cluster on
    127.0.0.1) loses the worker node holding most blocks at step 3: the blocks are rebuilt
    on the nodes left. Ends this process's Ray first: one process holds one Ray."""
    from tests.multinode import HEAD, local_cluster

    raw = strategy_config("pipeline", workdir, "node-reference", seed)
    reference = unlocked.run(raw)
    ray.shutdown()
    started = time.monotonic()
    with local_cluster({"node_a": 0, "node_b": 0}, cpus_per_node=2) as cluster:
        raw["run"]["name"] = f"node-lost-{seed}"
        raw["resources"] = {
            "address": cluster.address,
            "placement_strategy": "SPREAD",
            "cpus_per_worker": 0.5,
            "max_failures": 10,
        }
        stopped: list[str] = []

        class StopNode(unlocked.Callback):
            def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
                if step != 3 or stopped:
                    return
                names = cluster.node_names()
                hosts = Counter(names[p.node_id] for p in run.placement.values())
                stopped.append(next(n for n, _ in hosts.most_common() if n != HEAD))
                cluster.stop_node(stopped[0])

        faulted = unlocked.run(raw, callbacks=[StopNode()])
    seconds = time.monotonic() - started
    duplicated, missing = compare_logs(
        logged_steps(reference.tracking_uri, reference.mlflow_run_id),
        logged_steps(faulted.tracking_uri, faulted.mlflow_run_id),
    )
    recovered = faulted.failures >= 1 and faulted.step == raw["stop"]["max_steps"]
    return FaultOutcome(
        scenario="worker node lost",
        strategy="pipeline",
        faults_injected=len(stopped),
        faults_recovered=int(recovered and bool(stopped)),
        steps_duplicated=duplicated,
        steps_missing=missing,
        metric_delta=metric_delta(
            comparable_metrics(reference.metrics), comparable_metrics(faulted.metrics)
        ),
        seconds=seconds,
        detail=f"stopped {stopped[0] if stopped else 'nothing'}; {faulted.failures} failure(s)",
    )


# -- the soak: one long run, a worker killed every few minutes --------------------------
def growth_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    """The Theil-Sen slope (the median of the slopes between every two samples), per
    minute, of the last half of ``(seconds, value)`` samples.

    The first half is left out: start-up (imports, Ray's workers warming, the first
    checkpoints) grows memory once; a leak keeps growing. The median, not a least-squares
    fit, so the few samples caught mid-recovery (a worker gone, its replacement still
    importing) do not set the trend."""
    tail = list(samples)[len(samples) // 2 :]
    if len(tail) < 2:
        raise ValueError(f"samples: {len(samples)} given; need at least 3 to judge a trend")
    slopes = [
        (v2 - v1) / (t2 - t1)
        for k, (t1, v1) in enumerate(tail)
        for t2, v2 in tail[k + 1 :]
        if t2 != t1
    ]
    if not slopes:
        raise ValueError("samples: all taken at one time; need samples spread over time")
    return statistics.median(slopes) * 60.0


def is_flat(growth_per_min: float, threshold_per_min: float) -> bool:
    """Flat: the trend of the last half stays under ``threshold_per_min`` (shrinking is flat)."""
    return growth_per_min < threshold_per_min


LOG_MONITOR = "log_monitor.py"
"""Ray's log monitor keeps each finished worker's log files open (it may still have lines
to forward) until it holds ``RAY_LOG_MONITOR_MAX_OPEN_FILES`` (200), then closes them all:
every recovery adds a few, up to Ray's bound. Counted apart from the other files."""


@dataclass(frozen=True)
class Footprint:
    memory_mb: float
    """Proportional set size: each process's own pages plus its share of those it shares
    (the object store, libraries), so the sum over processes counts no page twice."""
    files: int
    """Open file descriptors, Ray's log monitor's left out (``log_monitor_files``)."""
    log_monitor_files: int


def process_footprint(root: psutil.Process) -> Footprint:
    """The footprint of ``root`` and every process under it (the driver, and the Ray it
    started: GCS, raylet, agents, workers)."""
    memory, files, log_files = 0, 0, 0
    for process in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            memory += process.memory_full_info().pss
            if any(LOG_MONITOR in part for part in process.cmdline()):
                log_files += process.num_fds()
            else:
                files += process.num_fds()
    return Footprint(memory / 2**20, files, log_files)


class FootprintSampler(threading.Thread):
    """Samples ``process_footprint`` of this process tree every ``every_s`` seconds."""

    def __init__(self, every_s: float) -> None:
        super().__init__(daemon=True)
        self.every_s = every_s
        self.samples: list[tuple[float, Footprint]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        me, started = psutil.Process(), time.monotonic()
        while not self.halt.is_set():
            self.samples.append((time.monotonic() - started, process_footprint(me)))
            self.halt.wait(self.every_s)

    def series(self, field: str) -> list[tuple[float, float]]:
        return [(t, float(getattr(footprint, field))) for t, footprint in self.samples]


class TimedKiller(SeededKiller):
    """Kills a seeded victim at the first step end ``every_s`` seconds after the last kill."""

    def __init__(self, every_s: float, seed: int) -> None:
        super().__init__((), seed)
        self.every_s = every_s
        self.last = time.monotonic()

    def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.due.add(step)
        super().on_step_end(run, step, metrics)


SOAK_MB_PER_MIN = 2.0
"""Flat enough: a run's own records grow a little (the metric history kept for the
result), far below what a leak per step or per recovery adds over 20 minutes."""
SOAK_FILES_PER_MIN = 0.5


def soak(workdir: Path, minutes: float, fault_every_s: float, seed: int = 0) -> dict[str, Any]:
    """One pipeline run of ``minutes`` with a seeded worker kill every ``fault_every_s``,
    the footprint of the driver and its Ray sampled throughout."""
    raw = strategy_config("pipeline", workdir, f"soak-{seed}", seed)
    raw["strategy"]["batches_per_step"] = 20
    raw["stop"] = {"max_steps": 10**9, "max_wall_s": minutes * 60}
    raw["checkpoint"]["every"] = 10
    raw["eval"]["every"] = 50
    raw["resources"]["max_failures"] = 10**6
    killer = TimedKiller(fault_every_s, seed)
    sampler = FootprintSampler(every_s=10.0)
    sampler.start()
    started = time.monotonic()
    try:
        result = unlocked.run(raw, callbacks=[killer])
    finally:
        sampler.halt.set()
        sampler.join()
    steps = logged_steps(result.tracking_uri, result.mlflow_run_id)
    _, missing = duplicated_and_missing(steps["train/loss"], range(1, result.step + 1))
    duplicated = sum(n - 1 for logged in steps.values() for n in Counter(logged).values())
    memory = growth_per_minute(sampler.series("memory_mb"))
    files = growth_per_minute(sampler.series("files"))
    first, last = sampler.samples[0][1], sampler.samples[-1][1]
    outcome = FaultOutcome(
        scenario=f"soak {minutes:.0f} min",
        strategy="pipeline",
        faults_injected=len(killer.victims),
        faults_recovered=min(len(killer.victims), killer.failures),
        steps_duplicated=duplicated,
        steps_missing=missing,
        metric_delta=0.0,  # no fault-free reference of a 20-minute run: see the footprint
        seconds=time.monotonic() - started,
        detail=f"{result.step} steps; memory {first.memory_mb:.0f}->{last.memory_mb:.0f} MB, "
        f"files {first.files}->{last.files}, log monitor's {last.log_monitor_files}",
    )
    return {
        "outcome": outcome,
        "soak_minutes": (time.monotonic() - started) / 60,
        "soak_memory_growth_mb_per_min": memory,
        "soak_open_files_growth": files,
        "soak_log_monitor_files": last.log_monitor_files,
        "soak_flat": is_flat(memory, SOAK_MB_PER_MIN) and is_flat(files, SOAK_FILES_PER_MIN),
    }
