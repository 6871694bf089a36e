"""Update-unlocked pipeline vs end-to-end backprop, side by side in one run.

    python -m benchmarks.pipeline [--quick]

Same network, same initial weights, same data order, same number of samples seen:
(a) backprop in one worker with one thread, (b) backprop with every core, (c) the
pipeline with K = 2 and K = 4 blocks on K actors of one thread each, with `linear` heads
and AugLocal (`augmented`) heads of depth 1 and 2. The JSON's headline pipeline figures
are K = 2 with augmented heads of depth 1; every run is under "runs". Every run goes
through the project's Controller on one local Ray (tracking off, so MLflow I/O is not
timed). Throughput counts training steps after the first (which includes filling the
pipeline). (e) is data-parallel backprop as a user writes it without the harness: one
process per core, one thread each, DistributedDataParallel on gloo, each process on its
share of every batch; ``speedup_vs_best_bp`` compares the headline pipeline with the faster
of (b) and (e).

The harness's own cost is measured against (d) a plain in-process PyTorch loop: the same
network from the same seed, Adam, one torch thread, on the very batches the harness trains
on, timed the same way (``benchmarks.torch_baselines``). It runs beside (a) on the
benchmark's model, and beside a 1-thread harness backprop on the issue's small ordinary
case (4x256 MLP, batch 128, 2 epochs, the strategy's default 20 batches per step), whose
ratio is ``harness_vs_plain_loop``. The same small case runs the K = 2 pipeline (linear and
augmented heads, the strategy's defaults otherwise): ``small_speedup_vs_bp_1thread`` and
``small_busy_fraction`` are its headline's; that case's runs are under "small_runs". Last
line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import ray
import torch

from benchmarks.report import json_line
from benchmarks.torch_baselines import data_parallel, plain_loop
from orchestrator.config import validate_mapping
from orchestrator.controller import Controller, RunResult
from workers.messages import from_wire, to_wire

CORES = os.cpu_count() or 1


def run_config(
    strategy: dict[str, Any], cpus: float, args: argparse.Namespace, root: str
) -> dict[str, Any]:
    return {
        "run": {"name": f"bench-{strategy['kind']}", "seed": 0},
        "strategy": {
            **strategy,
            "batches_per_step": args.batches_per_step,
            "optimizer": {"kind": "adam", "lr": args.lr},
        },
        "model": {"hidden": [args.width] * args.layers, "norm": "layernorm"},
        "data": {
            "dataset": "teacher",
            "size": args.size,
            "batch_size": args.batch_size,
            "root": args.data_root,
        },
        "resources": {"cpus_per_worker": cpus},
        "tracking": {"enabled": False},
        "checkpoint": {"root": f"{root}/ckpt", "every": 10_000},
        "stop": {"max_steps": args.steps},
        "eval": {"every": 10_000},
    }


def throughput(result: RunResult) -> float:
    """Samples per second over every step but the first (pipeline fill, lazy start-up)."""
    rates = [m["train/samples_per_s"] for _, m in result.history[1:]]
    return len(rates) / sum(1.0 / r for r in rates)


def busy_fractions(result: RunResult) -> list[float]:
    """Each worker's busy fraction, averaged over the steps after the first."""
    steps = [m for _, m in result.history[1:]] or [result.history[-1][1]]
    keys = sorted(k for k in steps[0] if k.endswith("/system/busy_fraction"))
    return [statistics.fmean(m[k] for m in steps) for k in keys]


def stage_budget(row: dict[str, Any], batch_size: int, plain: dict[str, Any]) -> str:
    """Where a pipeline's time per batch goes: each block's compute against the wall time,
    and the whole network's in a plain loop, the bound no cut of it can beat."""
    wall_ms = 1000 * batch_size / row["samples_per_s"]
    blocks = ", ".join(f"{f * wall_ms:.2f}" for f in row["busy_fractions"])
    return (
        f"{row['name']}: {wall_ms:.2f} ms per batch; blocks busy {blocks} ms of it; "
        f"whole network in the plain loop {1000 * batch_size / plain['samples_per_s']:.2f} ms"
    )


def measure(name: str, config: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    result = Controller(validate_mapping(config)).run()
    peaks = result.peak_training_bytes
    row = {
        "name": name,
        "accuracy": result.metrics["eval/accuracy"],
        "samples_per_s": throughput(result),
        "peak_mb_per_worker": max(peaks.values()) / 2**20,
        "wall_s": time.perf_counter() - start,
    }
    busy = busy_fractions(result)
    row["busy_fractions"] = busy
    row["mean_busy_fraction"] = statistics.fmean(busy) if busy else float("nan")
    held_out = f"acc {row['accuracy']:.4f}"
    if "eval/bits_per_token" in result.metrics:  # a language model (bytes: bits per char)
        row["bits_per_char"] = result.metrics["eval/bits_per_token"]
        held_out = f"bpc {row['bits_per_char']:.4f}"
    print(
        f"{name:<28} {held_out}  {row['samples_per_s']:9.0f} samples/s  "
        f"peak {row['peak_mb_per_worker']:7.1f} MB/worker  busy {row['mean_busy_fraction']:.2f}",
        flush=True,
    )
    return row


@ray.remote(num_cpus=0)
class Relay:
    """One hop of the pipeline's wire format, without the compute around it."""

    def __init__(self, numel: int) -> None:
        self.activation = torch.randn(numel)

    def send(self) -> Any:
        return to_wire(self.activation)

    def receive(self, value: Any) -> int:
        return from_wire(value).numel()


def transfer_mb_s(numel: int, repeats: int) -> tuple[float, float]:
    """Actor-to-actor activation throughput vs an in-process copy of the same tensor."""
    producer, consumer = Relay.remote(numel), Relay.remote(numel)
    ray.get(consumer.receive.remote(producer.send.remote()))  # warm both actors
    megabytes = numel * 4 / 2**20
    start = time.perf_counter()
    ray.get([consumer.receive.remote(producer.send.remote()) for _ in range(repeats)])
    actor = megabytes * repeats / (time.perf_counter() - start)
    tensor = torch.randn(numel)
    start = time.perf_counter()
    for _ in range(repeats):
        tensor.clone()
    local = megabytes * repeats / (time.perf_counter() - start)
    for handle in (producer, consumer):
        ray.kill(handle)
    return actor, local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, < 3 min on 2 cores")
    parser.add_argument("--data-root", default=".unlocked/datasets")
    parser.add_argument("--width", type=int, default=1024, help="hidden width")
    parser.add_argument("--layers", type=int, default=4, help="hidden layers")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, help="teacher samples (default 200k, quick 24k)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 2, quick 1)")
    parser.add_argument("--batches-per-step", type=int, default=5)
    args = parser.parse_args()
    args.size = args.size or (24_000 if args.quick else 200_000)
    epochs = args.epochs or (1 if args.quick else 2)
    args.steps = epochs * (args.size // args.batch_size) // args.batches_per_step

    ray.init(num_cpus=max(4, CORES), include_dashboard=False, logging_level="ERROR")
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as root:
        rows["bp_1thread"] = measure(
            "backprop, 1 thread", run_config({"kind": "backprop"}, 1, args, root)
        )
        rows["plain_loop"] = plain_loop(
            "plain torch loop, 1 thread", run_config({"kind": "backprop"}, 1, args, root)
        )
        rows["bp_allcores"] = measure(
            f"backprop, {CORES} threads", run_config({"kind": "backprop"}, CORES, args, root)
        )
        rows["dp_allcores"] = data_parallel(
            f"DDP backprop, {CORES} processes",
            run_config({"kind": "backprop"}, 1, args, root),
            CORES,
        )
        for blocks in (2, 4):
            for head, depth in (("linear", 1), ("augmented", 1), ("augmented", 2)):
                strategy = {
                    "kind": "pipeline",
                    "blocks": blocks,
                    "aux_head": head,
                    "aux_depth": depth,
                    "max_in_flight": 2 * blocks,
                }
                label = head if head == "linear" else f"{head}_d{depth}"
                rows[f"pipe_k{blocks}_{label}"] = measure(
                    f"pipeline K={blocks} {label}", run_config(strategy, 1, args, root)
                )
        small = argparse.Namespace(**vars(args))
        small.width, small.batch_size, small.batches_per_step = 256, 128, 20
        small.steps = 2 * (args.size // small.batch_size) // small.batches_per_step
        small_config = run_config({"kind": "backprop"}, 1, small, root)
        small_rows = {
            "bp_1thread": measure("small: backprop, 1 thread", small_config),
            "plain_loop": plain_loop("small: plain torch loop", small_config),
        }
        for head, label in (("linear", "linear"), ("augmented", "augmented_d1")):
            strategy = {"kind": "pipeline", "blocks": 2, "aux_head": head, "aux_depth": 1}
            small_rows[f"pipe_k2_{label}"] = measure(
                f"small: pipeline K=2 {label}", run_config(strategy, 1, small, root)
            )
    actor_mb_s, local_mb_s = transfer_mb_s(args.batch_size * args.width, 200 if args.quick else 500)
    ray.shutdown()

    bp1, bpall = rows["bp_1thread"], rows["bp_allcores"]
    best_bp = max((bpall, rows["dp_allcores"]), key=lambda row: row["samples_per_s"])
    print(
        f"\nsamples seen per run: {args.steps * args.batches_per_step * args.batch_size} "
        f"({epochs} epoch(s) of teacher-{args.size}); model {args.layers}x{args.width}; "
        f"{CORES} cores"
    )
    print(f"best backprop on {CORES} cores: {best_bp['name']}")
    print(
        f"{'run':<22} {'acc':>7} {'samples/s':>10} {'vs (a)':>7} {'vs (b)':>7} {'vs best':>7} "
        f"{'mem vs (a)':>10}"
    )
    for key, row in rows.items():
        row["speedup_vs_bp_1thread"] = row["samples_per_s"] / bp1["samples_per_s"]
        row["speedup_vs_bp_allcores"] = row["samples_per_s"] / bpall["samples_per_s"]
        row["speedup_vs_best_bp"] = row["samples_per_s"] / best_bp["samples_per_s"]
        row["mem_ratio"] = row["peak_mb_per_worker"] / bp1["peak_mb_per_worker"]
        print(
            f"{key:<22} {row['accuracy']:7.4f} {row['samples_per_s']:10.0f} "
            f"{row['speedup_vs_bp_1thread']:7.2f} {row['speedup_vs_bp_allcores']:7.2f} "
            f"{row['speedup_vs_best_bp']:7.2f} {row['mem_ratio']:10.2f}"
        )
    small_bp = small_rows["bp_1thread"]
    print(f"\nsmall case (4x256, batch 128): {'acc':>7} {'samples/s':>10} {'vs bp':>6} {'busy':>5}")
    for key, row in small_rows.items():
        row["speedup_vs_bp_1thread"] = row["samples_per_s"] / small_bp["samples_per_s"]
        print(
            f"{key:<30} {row['accuracy']:7.4f} {row['samples_per_s']:10.0f} "
            f"{row['speedup_vs_bp_1thread']:6.2f} {row['mean_busy_fraction']:5.2f}"
        )
    small_head = small_rows["pipe_k2_augmented_d1"]
    print("\nper-stage time budget:")
    for key in ("pipe_k2_linear", "pipe_k2_augmented_d1"):
        print(stage_budget(rows[key], args.batch_size, rows["plain_loop"]))
        print(stage_budget(small_rows[key], small.batch_size, small_rows["plain_loop"]))
    harness_vs_plain = small_bp["samples_per_s"] / small_rows["plain_loop"]["samples_per_s"]
    print(
        f"harness backprop vs plain torch loop, 1 thread: {harness_vs_plain:.3f}x on the "
        f"4x256 / batch-128 case, "
        f"{bp1['samples_per_s'] / rows['plain_loop']['samples_per_s']:.3f}x on "
        f"{args.layers}x{args.width} / batch {args.batch_size}"
    )
    print(
        f"activation transfer actor->actor {actor_mb_s:.0f} MB/s vs in-process copy "
        f"{local_mb_s:.0f} MB/s ({actor_mb_s / local_mb_s:.3f}x)"
    )
    head = rows["pipe_k2_augmented_d1"]
    print(
        json_line(
            {
                "bp_acc": bp1["accuracy"],
                "pipe_acc": head["accuracy"],
                "speedup_vs_bp_1thread": head["speedup_vs_bp_1thread"],
                "speedup_vs_bp_allcores": head["speedup_vs_bp_allcores"],
                "speedup_vs_best_bp": head["speedup_vs_best_bp"],
                "best_bp": best_bp["name"],
                "small_speedup_vs_bp_1thread": small_head["speedup_vs_bp_1thread"],
                "small_busy_fraction": small_head["mean_busy_fraction"],
                "mem_ratio": head["mem_ratio"],
                "transfer_mb_s": actor_mb_s,
                "transfer_vs_local_copy": actor_mb_s / local_mb_s,
                "harness_vs_plain_loop": harness_vs_plain,
                "harness_vs_plain_loop_main_model": bp1["samples_per_s"]
                / rows["plain_loop"]["samples_per_s"],
                "runs": rows,
                "small_runs": small_rows,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
