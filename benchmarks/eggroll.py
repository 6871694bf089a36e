"""EGGROLL, side by side with its baselines, in one run.

    python -m benchmarks.eggroll [--quick]

(1) population evaluation throughput (member-samples/s) of the EGGROLL forward, noise
    regeneration included, against plain batched inference of the unperturbed model
    (JSON: the minimum over hidden >= 1024 and at hidden 256), with the noise's share;
(2) against full-rank ES that materialises each member's weights: speedup and memory;
(3) against evotorch's PGPE on CartPole-v1 at the same population size: generations and
    wall time until the centre's mean return over 20 episodes reaches 475;
(4) generation time with 1 and 2 population workers and the bytes sent per generation.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import ray
import torch

from benchmarks.eggroll_forward import eval_vs_inference, versus_full_rank
from benchmarks.report import json_line
from orchestrator.config import validate_mapping
from orchestrator.controller import Controller

TARGET = 475.0


def cartpole_config(root: str, population: int, workers: int, max_steps: int) -> dict[str, Any]:
    return {
        "run": {"name": f"bench-es-{workers}", "seed": 0},
        "strategy": {
            "kind": "eggroll",
            "population": population,
            "rank": 1,
            "sigma": 0.1,
            "optimizer": {"kind": "adam", "lr": 0.05},
            "workers": workers,
            "checksum_every": 10,
            "task": {"kind": "gym", "env": "CartPole-v1", "hidden": [16], "eval_episodes": 20},
        },
        "tracking": {"enabled": False},
        "checkpoint": {"root": f"{root}/ckpt", "every": 10_000},
        "stop": {"max_steps": max_steps, "target": {"metric": "eval/return", "value": TARGET}},
        "eval": {"every": 1},
    }


def eggroll_cartpole(root: str, population: int, max_generations: int) -> dict[str, float]:
    start = time.perf_counter()
    result = Controller(validate_mapping(cartpole_config(root, population, 2, max_generations)))
    outcome = result.run()
    solved = outcome.metrics.get("eval/return", 0.0) >= TARGET
    return {
        "generations": outcome.step if solved else float("nan"),
        "wall_s": time.perf_counter() - start,
        "final_return": outcome.metrics.get("eval/return", float("nan")),
    }


def pgpe_cartpole(population: int, max_generations: int) -> dict[str, float]:
    """evotorch's PGPE with its documented CartPole settings (ClipUp, centred ranks)."""
    from evotorch.algorithms import PGPE
    from evotorch.neuroevolution import GymNE

    # evotorch samples from torch's and numpy's global generators: seed both.
    torch.manual_seed(0)
    np.random.seed(0)
    start = time.perf_counter()
    problem = GymNE(
        env="CartPole-v1",
        network="Linear(obs_length, 16) >> Tanh() >> Linear(16, act_length)",
        observation_normalization=False,
        num_episodes=1,
        num_actors=2,
    )
    searcher = PGPE(
        problem,
        popsize=population,
        center_learning_rate=0.1125,
        stdev_learning_rate=0.1,
        radius_init=2.25,
        optimizer="clipup",
        optimizer_config={"max_speed": 0.15},
        ranking_method="centered",
        symmetric=True,
        stdev_max_change=0.2,
    )
    final = 0.0
    for generation in range(1, max_generations + 1):
        searcher.step()
        policy = problem.to_policy(searcher.status["center"])
        final = float(problem.run(policy, num_episodes=20)["cumulative_reward"])
        if final >= TARGET:
            return {
                "generations": generation,
                "wall_s": time.perf_counter() - start,
                "final_return": final,
            }
    return {
        "generations": float("nan"),
        "wall_s": time.perf_counter() - start,
        "final_return": final,
    }


def generation_time(root: str, population: int, workers: int, generations: int) -> dict[str, float]:
    raw = cartpole_config(root, population, workers, generations)
    raw["strategy"]["task"]["max_episode_steps"] = 200
    raw["stop"] = {"max_steps": generations}
    raw["eval"] = {"every": 10_000}
    result = Controller(validate_mapping(raw)).run()
    steps = [m for _, m in result.history[1:]]
    return {
        "generation_s": statistics.median(population / m["train/members_per_s"] for m in steps),
        "bytes_per_generation": statistics.median(m["system/bytes_per_generation"] for m in steps),
    }


def print_breakdown(forward: list[dict[str, float]]) -> None:
    """Where a population evaluation's time goes: the ratio with and without regenerating
    the noise, and the noise's share of the time."""
    print("    hidden  population  vs inference  forward only  noise share  repeats")
    for row in forward:
        print(
            f"    {row['hidden']:6.0f}  {row['population']:10.0f}  {row['ratio']:12.2f}"
            f"  {row['forward_ratio']:12.2f}  {row['noise_share']:10.1%}  {row['repeats']:7.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, < 3 min on 2 cores")
    args = parser.parse_args()
    hidden = [256, 1024] if args.quick else [256, 1024, 2048, 4096]
    populations = [64, 256] if args.quick else [64, 256, 1024]
    samples = 16

    print("(1) population forward vs batched inference (member-samples/s)", flush=True)
    forward = eval_vs_inference(hidden, populations, samples, repeats=2 if args.quick else 3)
    for row in forward:
        print("   ", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    print_breakdown(forward)
    print("(2) low rank vs full rank ES", flush=True)
    full = versus_full_rank(hidden, populations[-1] if args.quick else 256, samples)
    for row in full:
        print("   ", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as root:
        print("(3) CartPole-v1 to a mean return of 475 (population 128)", flush=True)
        ours = eggroll_cartpole(root, 128, 60 if args.quick else 150)
        print("    eggroll", ours, flush=True)
        peer = pgpe_cartpole(128, 60 if args.quick else 150)
        print("    evotorch PGPE", peer, flush=True)
        print("(4) generation time by workers (population 256, CartPole, 200-step cap)")
        scaling = {w: generation_time(root, 256, w, 4 if args.quick else 8) for w in (1, 2)}
        for w, row in scaling.items():
            print(f"    {w} worker(s): {row}", flush=True)
    ray.shutdown()

    big = [r for r in forward if r["hidden"] >= 1024]
    small = [r for r in forward if r["hidden"] == 256]
    comparable = [r for r in full if not r.get("skipped")]
    print(
        json_line(
            {
                "eval_vs_inference": min(r["ratio"] for r in big),
                "eval_vs_inference_min_1024": min(r["ratio"] for r in big),
                "eval_vs_inference_256": min(r["ratio"] for r in small),
                "speedup_vs_full_rank": statistics.median(r["speedup"] for r in comparable),
                "mem_ratio_vs_full_rank": statistics.median(
                    r["noise_bytes_ratio"] for r in comparable
                ),
                "cartpole_generations": ours["generations"],
                "peer_cartpole_generations": peer["generations"],
                "cartpole_wall_s": ours["wall_s"],
                "peer_cartpole_wall_s": peer["wall_s"],
                "generation_s_1_worker": scaling[1]["generation_s"],
                "generation_s_2_workers": scaling[2]["generation_s"],
                "bytes_per_generation": scaling[2]["bytes_per_generation"],
                "forward": forward,
                "full_rank": full,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
