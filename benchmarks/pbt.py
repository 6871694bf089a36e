"""PBT, side by side with random search and Ray Tune's PBT, in one run.

    python -m benchmarks.pbt [--quick]

The task is one where the schedule matters: SGD on the `teacher` data, where a large
learning rate makes fast early progress and only a small one reaches a good optimum, so
no single fixed rate does both. At the same budget (trials x intervals) and from the same
initial learning rates, three searches run on one 2-CPU Ray:

(1) unlocked PBT (asynchronous, 2 slots, trials time-sliced onto them);
(2) random search: the same population with exploit turned off (quantile 0), so each
    trial keeps its sampled rate;
(3) Ray Tune's ``PopulationBasedTraining`` with the same options, whose function
    trainable trains the identical ``BackpropWorker`` (same network, initial weights,
    data order and evaluation), reporting and checkpointing once per interval.

Reported per search: the best trial's final held-out accuracy (mean over seeds) and
wall time; for unlocked PBT also the fraction of slot time spent training (busy) and in
exploit hand-overs. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from benchmarks.report import json_line
from orchestrator.config import validate_mapping
from orchestrator.controller import Controller
from orchestrator.data.source import DatasetInfo, resolve_dataset
from strategies.config import ModelConfig, OptimizerConfig
from strategies.pbt.driver import population_scheduler
from workers.trainer import BackpropWorker

LR_RANGE = (1e-3, 1.0)
METRIC = "eval/accuracy"


@dataclass(frozen=True)
class Setup:
    population: int
    slots: int
    intervals: int
    steps_per_interval: int
    batches_per_step: int
    data_size: int
    hidden: tuple[int, ...]
    batch_size: int = 128
    eval_batches: int = 16


QUICK = Setup(
    population=4,
    slots=2,
    intervals=10,
    steps_per_interval=4,
    batches_per_step=50,
    data_size=50_000,
    hidden=(128, 128),
)
FULL = Setup(
    population=8,
    slots=2,
    intervals=20,
    steps_per_interval=4,
    batches_per_step=50,
    data_size=50_000,
    hidden=(256, 256, 256),
)


def run_config(setup: Setup, root: str, seed: int, quantile: float) -> dict[str, Any]:
    return {
        "run": {"name": f"bench-pbt-q{quantile}-s{seed}", "seed": seed},
        "strategy": {
            "kind": "pbt",
            "population": setup.population,
            "concurrent_trials": setup.slots,
            "interval": setup.steps_per_interval,
            "metric": METRIC,
            "mode": "max",
            "quantile_fraction": quantile,
            "resample_probability": 0.25,
            "search_space": {"lr": {"loguniform": list(LR_RANGE)}},
            "inner": {
                "kind": "backprop",
                "batches_per_step": setup.batches_per_step,
                "optimizer": {"kind": "sgd", "lr": 0.01, "momentum": 0.9},
            },
        },
        "model": {"hidden": list(setup.hidden)},
        "data": {"dataset": "teacher", "size": setup.data_size, "batch_size": setup.batch_size},
        "tracking": {"enabled": False},
        "checkpoint": {"root": f"{root}/ckpt", "every": 10_000},
        "stop": {"max_steps": setup.intervals},
        "eval": {"every": setup.intervals, "max_batches": setup.eval_batches},
    }


def unlocked(setup: Setup, root: str, seed: int, quantile: float) -> dict[str, Any]:
    config = validate_mapping(run_config(setup, root, seed, quantile))
    start = time.perf_counter()
    controller = Controller(config)
    result = controller.run()
    wall = time.perf_counter() - start
    m = result.metrics
    return {
        "score": m["train/best_score"],
        "wall_s": wall,
        "busy": m["system/busy_fraction"],
        "exploit": m["system/exploit_overhead"],
        "switch": m["system/switch_overhead"],
        "capture": m["system/capture_overhead"],
        "exploits": m["train/exploits"],
        "initial_lrs": [t.hyperparameters["lr"] for t in initial_trials(config)],
    }


def initial_trials(config: Any) -> list[Any]:
    """The initial population PBT samples from this config's seed (to hand Tune the same)."""
    return population_scheduler(config.strategy, config.run.seed).trials


def tune_trainable(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune side of the comparison: the same worker, one report per interval."""
    from ray import tune

    setup: Setup = spec["setup"]
    worker = BackpropWorker(
        ModelConfig(hidden=list(setup.hidden)),
        OptimizerConfig(kind="sgd", lr=0.01, momentum=0.9),
        spec["dataset"],
        setup.batch_size,
        spec["seed"],
        1,
        "cpu",
        setup.eval_batches,
    )
    next_batch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / "state.pt", weights_only=True)
        worker.restore(saved["worker"])
        next_batch = int(saved["next_batch"])
    worker.set_lr(config["lr"])
    batches = setup.steps_per_interval * setup.batches_per_step
    while True:
        worker.train(next_batch, batches)
        next_batch += batches
        scores = worker.evaluate()
        with tempfile.TemporaryDirectory() as directory:
            torch.save(
                {"worker": worker.state(), "next_batch": next_batch},
                Path(directory) / "state.pt",
            )
            tune.report(
                {"accuracy": scores["accuracy"], "loss": scores["loss"]},
                checkpoint=tune.Checkpoint.from_directory(directory),
            )


def ray_tune_pbt(
    setup: Setup, root: str, seed: int, dataset: DatasetInfo, initial_lrs: list[float]
) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    scheduler = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=1,
        hyperparam_mutations={"lr": tune.loguniform(*LR_RANGE)},
        quantile_fraction=0.25,
        resample_probability=0.25,
        perturbation_factors=(1.2, 0.8),
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            tune_trainable, spec={"setup": setup, "dataset": dataset, "seed": seed}
        ),
        {"cpu": 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"lr": tune.grid_search(initial_lrs)},
        tune_config=tune.TuneConfig(
            metric="accuracy",
            mode="max",
            scheduler=scheduler,
            max_concurrent_trials=setup.slots,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"tune-pbt-s{seed}",
            storage_path=f"{root}/tune",
            stop={"training_iteration": setup.intervals},
            verbose=0,
        ),
    )
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    best = results.get_best_result(metric="accuracy", mode="max", scope="last")
    return {"score": best.metrics["accuracy"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller population and budget")
    parser.add_argument("--seeds", type=int, default=None, help="seeds averaged (default 3)")
    args = parser.parse_args()
    setup = QUICK if args.quick else FULL
    seeds = args.seeds or 3
    # Tune's trials log every checkpoint; the figures below are what this run reports.
    ray.init(
        num_cpus=setup.slots, include_dashboard=False, logging_level="ERROR", log_to_driver=False
    )
    rows: dict[str, list[dict[str, Any]]] = {"pbt": [], "random": [], "tune": []}
    with tempfile.TemporaryDirectory() as root:
        probe = validate_mapping(run_config(setup, root, 0, 0.25))
        dataset = resolve_dataset(probe.data)
        for seed in range(seeds):
            pbt = unlocked(setup, root, seed, 0.25)
            rows["pbt"].append(pbt)
            rows["random"].append(unlocked(setup, root, seed, 0.0))
            rows["tune"].append(ray_tune_pbt(setup, root, seed, dataset, pbt["initial_lrs"]))
            print(
                f"seed {seed}: pbt {pbt['score']:.4f} ({pbt['wall_s']:.1f} s, "
                f"{pbt['exploits']:.0f} exploits) | random {rows['random'][-1]['score']:.4f} "
                f"({rows['random'][-1]['wall_s']:.1f} s) | tune pbt "
                f"{rows['tune'][-1]['score']:.4f} ({rows['tune'][-1]['wall_s']:.1f} s) | "
                f"initial lrs {[round(lr, 4) for lr in pbt['initial_lrs']]}",
                flush=True,
            )
    ray.shutdown()

    def mean(name: str, key: str) -> float:
        return statistics.fmean(r[key] for r in rows[name])

    budget = setup.population * setup.intervals
    print(
        f"\n{setup.population} trials x {setup.intervals} intervals of "
        f"{setup.steps_per_interval * setup.batches_per_step} batches ({budget} intervals), "
        f"{setup.slots} slots, {seeds} seed(s); best trial's final {METRIC}, mean over seeds"
    )
    print("| search | accuracy | wall s | vs Tune wall |")
    print("|---|---|---|---|")
    tune_wall = mean("tune", "wall_s")
    for name, label in (("pbt", "unlocked PBT"), ("random", "random search"), ("tune", "Tune PBT")):
        print(
            f"| {label} | {mean(name, 'score'):.4f} | {mean(name, 'wall_s'):.1f} | "
            f"{mean(name, 'wall_s') / tune_wall:.2f} |"
        )
    print(
        f"unlocked PBT slots: busy {mean('pbt', 'busy'):.1%}, exploit hand-over "
        f"{mean('pbt', 'exploit'):.2%}, time-slice switches {mean('pbt', 'switch'):.2%}, "
        f"state capture {mean('pbt', 'capture'):.2%} of slot time"
    )
    print(
        json_line(
            {
                "pbt_score": mean("pbt", "score"),
                "random_search_score": mean("random", "score"),
                "tune_pbt_score": mean("tune", "score"),
                "wall_ratio_vs_tune": mean("pbt", "wall_s") / tune_wall,
                "busy_fraction": mean("pbt", "busy"),
                "exploit_overhead": mean("pbt", "exploit"),
                "seeds": seeds,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
