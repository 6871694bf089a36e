"""PI-HC-MoE against its baselines, side by side in one run.

    python -m benchmarks.moe_hc [--quick]

Part 1, accuracy at an equal training budget, on each PDE: the soft-constraint PINN
(residual as a penalty), the single global hard constraint (one expert) and the MoE with
2, 4 and 8 experts: same basis network, same initial weights, same instances, same
batches. Relative L2 error against the project's reference solver on the held-out
instances, the PDE residual on held-out points, time per training batch and per
inference (one held-out instance), and peak memory per worker.

Part 2, the paper's scaling figure: time per training batch of the global solve and of
the MoE with 2 and 4 experts as the sampled constraint points grow (256 to 8,192).

Part 3, accuracy at equal wall time: the global solve and the MoE trained for the same
seconds at many constraint points, where the MoE's batches are cheaper.

``--outer-loss`` sets what the hard-constraint runs train on (``strategy.outer_loss``:
the stitched solution's residual as the paper does, the data loss, or both).

Every run goes through the project's Controller on one local Ray (tracking off, so
MLflow I/O is not timed); times are medians over the steps after the first.
Headline JSON figures: the first problem (diffusion–sorption), MoE with 4 experts (the
paper's split) for accuracy (``residual_ratio_moe_vs_soft_max``: its held-out residual
over the soft PINN's, the worst problem), and for time the MoE with as many experts as
cores (the most that can run in parallel here): against the global solve at the largest
number of constraint points, and each one's growth from the fewest points to the most.
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
from strategies.moe_hc.config import MoEHCConfig

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
        "outer_loss": args.outer_loss,
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
        "stop": {"max_steps": args.steps, "max_wall_s": args.wall_s},
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
        "batches": result.step * args.batches_per_step,
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
        f"expert {expert_mb}  {row['batches']} batches ({row['wall_s']:.0f} s)",
        flush=True,
    )
    return row


def equal_wall_time(args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    """Each variant trains one batch per step until the same wall time has passed."""
    timed = argparse.Namespace(
        **{**vars(args), "steps": 100_000, "batches_per_step": 1, "wall_s": args.equal_wall_s}
    )
    rows = []
    for variant in args.scaling_variants:
        row = measure(args.problems[0], variant, args.equal_wall_points, timed, root)
        rows.append(row)
    return rows


def growth(scaling: list[dict[str, Any]], variant: str) -> float:
    """Time per batch at the most constraint points over the time at the fewest."""
    times = {r["constraint_points"]: r["step_s"] for r in scaling if r["variant"] == variant}
    return times[max(times)] / times[min(times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, same JSON keys")
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS))
    parser.add_argument(
        "--parts", nargs="+", type=int, choices=[1, 2, 3], help="default: 1 2 3 (quick: 1 2)"
    )
    parser.add_argument(
        "--outer-loss",
        choices=["residual", "data", "both"],
        default=MoEHCConfig.model_fields["outer_loss"].default,
        help="strategy.outer_loss of the hard-constraint runs (default: the strategy's)",
    )
    parser.add_argument("--data-root", default=".unlocked/datasets")
    args = parser.parse_args()
    if args.quick:
        args.problems = args.problems or ["diffusion_sorption", "heat"]  # NS: minutes
        args.steps, args.batches_per_step, args.points = 4, 4, 512
        args.scaling_points, args.scaling_variants = [256, 2048], ["global", f"moe-{CORES}"]
        args.parts = args.parts or [1, 2]  # part 3 needs minutes of training to say anything
        args.equal_wall_points, args.equal_wall_s = 2048, 60.0
        counts = [2, 4]
    else:
        args.problems = args.problems or ["diffusion_sorption", "navier_stokes", "heat"]
        args.steps, args.batches_per_step, args.points = 30, 5, 1024
        args.scaling_points = [256, 512, 1024, 2048, 4096, 8192]
        args.scaling_variants = ["global", "moe-2", "moe-4"]
        args.parts = args.parts or [1, 2, 3]
        args.equal_wall_points, args.equal_wall_s = 4096, 120.0
        counts = [2, 4, 8]
    args.functions, args.width, args.boundary_points, args.lr = 32, 64, 64, 3e-3
    args.wall_s = None
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=max(CORES, 9), include_dashboard=False, logging_level="ERROR")
    rows, scaling, equal_wall = [], [], []
    with tempfile.TemporaryDirectory() as root:
        if 1 in args.parts:
            print(
                f"part 1: accuracy at an equal budget ({args.steps} x {args.batches_per_step} "
                f"batches), outer loss: {args.outer_loss}"
            )
            for problem in args.problems:
                for variant in ["soft", "global", *(f"moe-{k}" for k in counts)]:
                    rows.append(measure(problem, variant, args.points, args, root))
        if 2 in args.parts:
            print("part 2: time per batch as the constraint points grow")
            scaling_args = argparse.Namespace(**{**vars(args), "steps": 3, "batches_per_step": 2})
            scaling = [
                measure(args.problems[0], variant, points, scaling_args, root)
                for points in args.scaling_points
                for variant in args.scaling_variants
            ]
        if 3 in args.parts:
            print(
                f"part 3: accuracy at equal wall time ({args.equal_wall_s:.0f} s of training, "
                f"{args.equal_wall_points} constraint points)"
            )
            equal_wall = equal_wall_time(args, root)
    ray.shutdown()
    print(json_line(headline_figures(args, counts, rows, scaling, equal_wall)))


def headline_figures(
    args: argparse.Namespace,
    counts: list[int],
    rows: list[dict[str, Any]],
    scaling: list[dict[str, Any]],
    equal_wall: list[dict[str, Any]],
) -> dict[str, Any]:
    """The JSON line; a figure whose part did not run is null."""

    def row(problem: str, variant: str) -> dict[str, Any]:
        return next(r for r in rows if r["problem"] == problem and r["variant"] == variant)

    headline, moe_variant = args.problems[0], f"moe-{4 if 4 in counts else counts[-1]}"
    keys = (
        "soft_rel_l2",
        "hc_rel_l2",
        "moe_rel_l2",
        "step_time_ratio_moe_vs_global",
        "step_time_experts",
        "residual_ratio_moe_vs_soft",
        "residual_ratio_moe_vs_soft_max",
        "step_time_growth_global",
        "step_time_growth_moe",
    )
    figures: dict[str, Any] = {"problem": headline, "outer_loss": args.outer_loss}
    figures |= dict.fromkeys(keys)
    if rows:
        soft, moe = row(headline, "soft"), row(headline, moe_variant)
        ratios = {
            p: row(p, moe_variant)["pde_residual"] / row(p, "soft")["pde_residual"]
            for p in args.problems
        }
        for p, ratio in ratios.items():
            print(f"{p:<19} held-out residual, {moe_variant} / soft: {ratio:.2f}")
        figures |= {
            "soft_rel_l2": soft["rel_l2"],
            "hc_rel_l2": row(headline, "global")["rel_l2"],
            "moe_rel_l2": moe["rel_l2"],
            "residual_ratio_moe_vs_soft": moe["pde_residual"] / soft["pde_residual"],
            "residual_ratio_moe_vs_soft_max": max(ratios.values()),
        }
    if scaling:
        largest = args.scaling_points[-1]
        timed = {r["variant"]: r["step_s"] for r in scaling if r["constraint_points"] == largest}
        parallel = f"moe-{CORES}" if f"moe-{CORES}" in timed else args.scaling_variants[-1]
        for variant in args.scaling_variants:
            print(
                f"{variant:<7} time per batch, {largest} / {args.scaling_points[0]} points: "
                f"{growth(scaling, variant):.2f}x"
            )
        figures |= {
            "step_time_ratio_moe_vs_global": timed[parallel] / timed["global"],
            "step_time_experts": int(parallel.removeprefix("moe-")),
            "step_time_growth_global": growth(scaling, "global"),
            "step_time_growth_moe": growth(scaling, parallel),
        }
    return figures | {
        "cores": CORES,
        "runs": rows,
        "scaling": scaling,
        "equal_wall_time": equal_wall,
    }


if __name__ == "__main__":
    main()
