"""Activation offloading (SSDTrain-style, ``engine.offload_activations``) against keeping
the activations in memory, side by side in one run.

    python -m benchmarks.offload [--quick]

Four cases, each run with the activations kept (``none``), offloaded to files (``disk``)
and, where a GPU exists, to pinned host memory (``host``), the config otherwise the same
(seed, data order, samples seen): backprop in one worker and the update-unlocked pipeline
(K = 2, linear heads) over an MLP on the ``teacher`` set and a ResNet on the built-in
``digits-images``. Columns: peak training memory per worker (MB; on a CPU the workers'
accounting of parameters, gradients, optimizer state and the saved activations that stay
in memory, on a GPU the allocator's peak) and samples/s over the steps after the first,
each with its ratio to the same case without offloading. Every run goes through the
Controller on one local Ray, tracking off. The files go under a temporary directory on the
same file system as the system's temporary directory; the OS's page cache sits between
the writes and the device, so on a machine with free memory a short run's "disk" is
mostly memory bandwidth. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import ray
import torch

from benchmarks.pipeline import measure
from benchmarks.report import json_line

CORES = os.cpu_count() or 1
CASES = ("mlp-teacher", "resnet-digits")
STRATEGIES = ("backprop", "pipeline")


def modes() -> list[str]:
    """Offload targets to compare: host memory only where it is not the activations'."""
    return ["none", "disk", "host"] if torch.cuda.is_available() else ["none", "disk"]


def network_and_data(case: str, args: argparse.Namespace) -> dict[str, Any]:
    if case == "mlp-teacher":
        return {
            "model": {"hidden": [args.width] * 4, "norm": "layernorm"},
            "data": {
                "dataset": "teacher",
                "size": args.size,
                "batch_size": args.batch_size,
                "root": args.data_root,
            },
        }
    return {
        "model": {"kind": "resnet", "depth": args.resnet_depth, "width": 16},
        "data": {"dataset": "digits-images", "batch_size": 64, "root": args.data_root},
    }


def run_config(
    strategy: str, case: str, offload: str, args: argparse.Namespace, root: str
) -> dict[str, Any]:
    workers = 2 if strategy == "pipeline" else 1
    section: dict[str, Any] = {"kind": strategy, "batches_per_step": args.batches_per_step}
    if strategy == "pipeline":
        section.update(blocks=2, aux_head="linear", max_in_flight=4)
    engine: dict[str, Any] = {"offload_activations": offload}
    if offload == "disk":
        engine["offload_dir"] = root
    gpus = 1 / workers if torch.cuda.is_available() else 0.0
    return {
        "run": {"name": f"bench-offload-{strategy}-{case}-{offload}", "seed": 0},
        "strategy": {**section, "optimizer": {"kind": "adam", "lr": 1e-3}},
        **network_and_data(case, args),
        "resources": {"cpus_per_worker": 1, "gpus_per_worker": gpus},
        "engine": engine,
        "tracking": {"enabled": False},
        "checkpoint": {"root": f"{root}/ckpt-{strategy}-{case}-{offload}", "every": 10_000},
        "stop": {"max_steps": args.steps},
        "eval": {"every": 10_000},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, < 3 min on 2 cores")
    parser.add_argument("--data-root", default=".unlocked/datasets")
    parser.add_argument("--width", type=int, help="MLP hidden width (default 1024, quick 256)")
    parser.add_argument("--batch-size", type=int, default=256, help="MLP batch size")
    parser.add_argument("--size", type=int, help="teacher samples (default 50k, quick 8k)")
    parser.add_argument("--resnet-depth", type=int, help="ResNet depth (default 20, quick 8)")
    parser.add_argument("--steps", type=int, help="steps per run (default 12, quick 4)")
    parser.add_argument("--batches-per-step", type=int, default=5)
    args = parser.parse_args()
    args.width = args.width or (256 if args.quick else 1024)
    args.size = args.size or (8_000 if args.quick else 50_000)
    args.resnet_depth = args.resnet_depth or (8 if args.quick else 20)
    args.steps = args.steps or (4 if args.quick else 12)

    ray.init(num_cpus=max(4, CORES), include_dashboard=False, logging_level="ERROR")
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as root:
        for case in CASES:
            for strategy in STRATEGIES:
                for offload in modes():
                    name = f"{strategy}/{case}/{offload}"
                    rows[name] = measure(name, run_config(strategy, case, offload, args, root))
    ray.shutdown()

    print(
        f"\n{args.steps} steps of {args.batches_per_step} batches per run; MLP 4x{args.width} "
        f"(batch {args.batch_size}), ResNet-{args.resnet_depth} (batch 64); {CORES} cores"
    )
    print(f"{'run':<32} {'peak MB/worker':>14} {'vs none':>8} {'samples/s':>10} {'vs none':>8}")
    figures: dict[str, Any] = {}
    for name, row in rows.items():
        strategy, case, _ = name.split("/")
        kept = rows[f"{strategy}/{case}/none"]
        row["mem_ratio"] = row["peak_mb_per_worker"] / kept["peak_mb_per_worker"]
        row["speed_ratio"] = row["samples_per_s"] / kept["samples_per_s"]
        print(
            f"{name:<32} {row['peak_mb_per_worker']:14.2f} {row['mem_ratio']:8.2f} "
            f"{row['samples_per_s']:10.0f} {row['speed_ratio']:8.2f}"
        )
        figures[name] = {
            key: row[key]
            for key in ("peak_mb_per_worker", "mem_ratio", "samples_per_s", "speed_ratio")
        }
    print(json_line({"cores": CORES, "quick": args.quick, "runs": figures}))


if __name__ == "__main__":
    main()
