"""PI-HC-MoE against its baselines, side by side in one run.

    python -m benchmarks.moe_hc [--quick]

Part 1, accuracy at an equal training budget, on each PDE: the soft-constraint PINN
(residual as a penalty), the single global hard constraint (one expert) and the MoE with
2, 4 and 8 experts: same basis network, same initial weights, same instances, same
batches. Relative L2 error against the project's reference solver on the held-out
instances, the PDE residual on held-out points, time per training batch and per
inference (one held-out instance), and peak memory per worker.

Part 2, the paper's scaling figure: time per training batch of the global solve and of
the MoE as the number of sampled constraint points grows.

Every run goes through the project's Controller on one local Ray (tracking off, so
MLflow I/O is not timed); times are medians over the steps after the first.
Headline JSON figures: the first problem (diffusion–sorption), MoE with 4 experts (the
paper's split) for accuracy, and for time the MoE with as many experts as cores (the
most that can run in parallel here) at the largest number of constraint points.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import ray

from benchmarks.report import json_line
from orchestrator.config import validate_mapping
from orchestrator.controller import Controller

CORES = os.cpu_count() or 1

# Experts per count: split the first coordinate, then the second (2-D problems).
SPLITS = {
    "heat": {2: {"x": 2}, 4: {"x": 4}, 8: {"x": 8}},
    "diffusion_sorption": {2: {"x": 2}, 4: {"x": 4}, 8: {"x": 8}},
    "navier_stokes": {2: {"x": 2}, 4: {"x": 2, "y": 2}, 8: {"x": 4, "y": 2}},
}
PROBLEMS = {
    "heat": {"kind": "heat", "train_instances": 64, "test_instances": 16},
    "diffusion_sorption": {"kind": "diffusion_sorption", "train_instances": 64},
    "navier_stokes": {"kind": "navier_stokes", "train_instances": 32, "test_instances": 8},
}


def run_config(
    problem: str, variant: str, points: int, args: argparse.Namespace, root: str
) -> dict[str, Any]:
    strategy: dict[str, Any] = {
        "kind": "moe_hc",
        "problem": {**PROBLEMS[problem], "root": args.data_root},
        "constraint": "soft" if variant == "soft" else "hard",
        "basis": {"functions": args.functions, "width": args.width, "depth": 3},
        "constraint_points": points,
        "boundary_points": args.boundary_points,
        "batches_per_step": args.batches_per_step,
        "optimizer": {"kind": "adam", "lr": args.lr},
    }
    if variant.startswith("moe-"):
        strategy["experts"] = SPLITS[problem][int(variant.removeprefix("moe-"))]
    return {
        "run": {"name": f"bench-{problem}-{variant}", "seed": 0},
        "strategy": strategy,
        "resources": {"cpus_per_worker": 1},
        "tracking": {"enabled": False},
        "checkpoint": {"root": f"{root}/ckpt", "every": 100_000},
        "stop": {"max_steps": args.steps},
        "eval": {"every": 100_000},
    }


def measure(problem: str, variant: str, points: int, args: argparse.Namespace, root: str):
    start = time.perf_counter()
    result = Controller(validate_mapping(run_config(problem, variant, points, args, root))).run()
    steps = [m["train/step_s"] for _, m in result.history[1:]] or [
        m["train/step_s"] for _, m in result.history
    ]
    peaks = result.peak_training_bytes
    experts = [v for k, v in peaks.items() if k.startswith("expert-")]
    row = {
        "problem": problem,
        "variant": variant,
        "constraint_points": points,
        "rel_l2": result.metrics["eval/rel_l2"],
        "pde_residual": result.metrics["eval/pde_residual"],
        "step_s": statistics.median(steps),
        "inference_s": result.metrics["eval/inference_s"],
        "peak_mb_basis": peaks.get("basis-0", 0) / 2**20,
        "peak_mb_per_expert": (max(experts) / 2**20) if experts else None,
        "wall_s": time.perf_counter() - start,
    }
    expert_mb = "-" if row["peak_mb_per_expert"] is None else f"{row['peak_mb_per_expert']:.0f}"
    print(
        f"{problem:<19} {variant:<7} pts {points:>6}  rel L2 {row['rel_l2']:.4f}  "
        f"residual {row['pde_residual']:.4f}  step {row['step_s'] * 1e3:8.1f} ms  "
        f"infer {row['inference_s'] * 1e3:7.1f} ms  peak MB basis {row['peak_mb_basis']:.0f} "
        f"expert {expert_mb}  ({row['wall_s']:.0f} s)",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, same JSON keys")
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS))
    parser.add_argument("--data-root", default=".unlocked/datasets")
    args = parser.parse_args()
    if args.quick:
        args.problems = args.problems or ["diffusion_sorption", "navier_stokes"]
        args.steps, args.batches_per_step, args.points = 4, 4, 512
        args.scaling_points, args.scaling_variants = [256, 2048], ["global", f"moe-{CORES}"]
        counts = [2, 4]
    else:
        args.problems = args.problems or ["diffusion_sorption", "navier_stokes", "heat"]
        args.steps, args.batches_per_step, args.points = 30, 5, 1024
        args.scaling_points = [256, 1024, 4096, 16384]
        args.scaling_variants = ["global", "moe-2", "moe-4"]
        counts = [2, 4, 8]
    args.functions, args.width, args.boundary_points, args.lr = 32, 64, 64, 3e-3
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=max(CORES, 9), include_dashboard=False, logging_level="ERROR")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        print(
            f"part 1: accuracy at an equal budget ({args.steps} x {args.batches_per_step} batches)"
        )
        for problem in args.problems:
            for variant in ["soft", "global", *(f"moe-{k}" for k in counts)]:
                rows.append(measure(problem, variant, args.points, args, root))
        print("part 2: time per batch as the constraint points grow")
        scaling_args = argparse.Namespace(**{**vars(args), "steps": 3, "batches_per_step": 2})
        scaling = [
            measure(args.problems[0], variant, points, scaling_args, root)
            for points in args.scaling_points
            for variant in args.scaling_variants
        ]
    ray.shutdown()

    def row(problem: str, variant: str) -> dict[str, Any]:
        return next(r for r in rows if r["problem"] == problem and r["variant"] == variant)

    headline = args.problems[0]
    moe = row(headline, f"moe-{4 if 4 in counts else counts[-1]}")
    largest = args.scaling_points[-1]
    timed = {r["variant"]: r["step_s"] for r in scaling if r["constraint_points"] == largest}
    parallel = f"moe-{CORES}" if f"moe-{CORES}" in timed else args.scaling_variants[-1]
    figures = {
        "problem": headline,
        "soft_rel_l2": row(headline, "soft")["rel_l2"],
        "hc_rel_l2": row(headline, "global")["rel_l2"],
        "moe_rel_l2": moe["rel_l2"],
        "step_time_ratio_moe_vs_global": timed[parallel] / timed["global"],
        "step_time_experts": int(parallel.removeprefix("moe-")),
        "residual_ratio_moe_vs_soft": moe["pde_residual"] / row(headline, "soft")["pde_residual"],
        "cores": CORES,
        "runs": rows,
        "scaling": scaling,
    }
    print(json_line(figures))


if __name__ == "__main__":
    main()
