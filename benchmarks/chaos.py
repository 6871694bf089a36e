"""The chaos suite: faults injected into real runs, and what the runs made of them.

    python -m benchmarks.chaos [--quick] [--seed N]

On a local Ray (127.0.0.1 only), every strategy (pipeline, backprop, EGGROLL, PBT,
MoE-HC; ``--quick``: pipeline and EGGROLL) is trained once without faults and once with
workers killed at seeded steps (three per run; ``--quick``: two); the storage scenarios
(``benchmarks.chaos_storage``: MLflow stopped and restarted, an interrupted checkpoint
write, full or read-only storage) and the bad inputs (``benchmarks.chaos_inputs``) run
beside them. Each scenario is compared with its fault-free run of the same seed:
final metrics, and every MLflow step logged once.

The full mode adds a pipeline's driver SIGKILLed and resumed with `--resume`, a lost
worker node (a head and two worker nodes on this machine, ``tests/multinode.py``) and a
soak: one pipeline run of 20 minutes with a worker killed every 3 minutes, the
memory and open files of the driver and its Ray sampled throughout.

Prints one row per scenario; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.chaos_outcome import ChaosTotals, FaultOutcome
from benchmarks.report import json_line
from orchestrator.cluster import single_machine_mode

SOAK_MINUTES = 20.0
SOAK_FAULT_EVERY_S = 180.0


def print_table(outcomes: list[FaultOutcome]) -> None:
    print(
        f"{'strategy':<9} {'fault':<30} {'injected':>8} {'recovered':>9} {'dup':>4} "
        f"{'missing':>7} {'metric delta':>12} {'seconds':>8}  detail"
    )
    for o in outcomes:
        print(
            f"{o.strategy:<9} {o.scenario:<30} {o.faults_injected:>8} {o.faults_recovered:>9} "
            f"{o.steps_duplicated:>4} {o.steps_missing:>7} {o.metric_delta:>12.3g} "
            f"{o.seconds:>8.1f}  {o.detail}"
        )


QUICK_STRATEGIES = ("pipeline", "eggroll")
"""The quick mode's: the two ways workers hold a model (blocks in a chain, replicas of one
population), about 35 s each with two kills; the full mode kills in every strategy."""


def worker_scenarios(workdir: Path, quick: bool, seed: int) -> list[FaultOutcome]:
    from benchmarks import chaos_workers

    outcomes = []
    for kind in QUICK_STRATEGIES if quick else chaos_workers.STRATEGIES:
        outcome = chaos_workers.seeded_kills(kind, workdir, seed, kills=2 if quick else 3)
        done = f"{outcome.faults_recovered}/{outcome.faults_injected}"
        print(f"  {kind}: {done} recovered, {outcome.seconds:.0f} s", flush=True)
        outcomes.append(outcome)
    if not quick:  # two `unlocked run` processes, each starting Ray: about 80 s
        outcomes.append(chaos_workers.driver_kill_then_resume(workdir, seed))
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, < 4 min on 2 cores")
    parser.add_argument("--seed", type=int, default=0, help="seeds the runs and the faults")
    args = parser.parse_args()
    single_machine_mode()  # before Ray starts: every listener on 127.0.0.1
    import ray

    from benchmarks import chaos_inputs, chaos_storage, chaos_workers

    started = time.monotonic()
    totals = ChaosTotals()
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="chaos-") as root:
        workdir = Path(root)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
        print("worker faults", flush=True)
        for outcome in worker_scenarios(workdir, args.quick, args.seed):
            totals.add(outcome)
        if not args.quick:
            print(f"soak: {SOAK_MINUTES:.0f} min, a worker killed every {SOAK_FAULT_EVERY_S:.0f} s")
            soaked = chaos_workers.soak(workdir, SOAK_MINUTES, SOAK_FAULT_EVERY_S, args.seed)
            totals.add(soaked.pop("outcome"))
            extra.update(soaked)
        print("storage faults", flush=True)
        for outcome in chaos_storage.run_all(args.quick, args.seed):  # on this Ray
            totals.add(outcome)
        ray.shutdown()  # the listener count must see only the run it starts
        print("bad inputs", flush=True)
        tried, clean = chaos_inputs.bad_inputs(args.quick)
        listeners = chaos_inputs.public_listeners_during_run(args.quick)
        if not args.quick:
            print("worker node lost", flush=True)
            totals.add(chaos_workers.node_lost(workdir, args.seed))
    print_table(totals.outcomes)
    print(f"bad inputs: {clean} of {tried} rejected with one clean message")
    print(f"non-loopback listening sockets during a local run: {listeners}")
    print(f"total {time.monotonic() - started:.0f} s")
    figures = {
        **totals.figures(),
        "bad_inputs_tried": tried,
        "bad_inputs_clean": clean,
        "public_listeners": listeners,
        **extra,
        "scenarios": [
            {
                "scenario": o.scenario,
                "strategy": o.strategy,
                "injected": o.faults_injected,
                "recovered": o.faults_recovered,
                "steps_duplicated": o.steps_duplicated,
                "steps_missing": o.steps_missing,
                "metric_delta": o.metric_delta,
                "seconds": round(o.seconds, 1),
            }
            for o in totals.outcomes
        ],
    }
    print(json_line(figures))


if __name__ == "__main__":
    main()
