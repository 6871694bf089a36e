"""Scaling on this machine: workers, engines and transports, and a cost model that says
how step time grows beyond it.

    python -m benchmarks.scaling [--quick]

(a) The pipeline with 1, 2 and 4 blocks on as many actors (one thread each, linear
heads, the same network, data and samples seen), through the Controller on one local
Ray. Throughput counts every step but the first.
(b) EGGROLL with 1, 2 and 4 population workers on the same population, model and data
(supervised classification on the teacher set); throughput is members scored per second.
(c) One pipeline block trained under each engine (torch, accelerate, deepspeed):
``benchmarks.engines``.
(d) The two pipeline transports, object store and Ray Compiled Graphs:
``benchmarks.transport``.
(e) The cost model (``benchmarks.cost_model``) fed with costs measured here in-process
(each block's compute, one member's fitness, one update) and between actors (a call's
overhead, the transfer rate), its prediction beside each measured run of (a) and (b),
then extrapolated to more nodes and larger models.

Worker counts above the core count cannot speed anything up: they show what sharing
cores costs. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import ray
import torch

from benchmarks.cost_model import (
    EggrollCosts,
    PipelineCosts,
    eggroll_generation_s,
    pipeline_batch_s,
    relative_error,
    scaled_eggroll,
    scaled_pipeline,
)
from benchmarks.engines import measure_engine_overhead
from benchmarks.pipeline import measure
from benchmarks.report import json_line
from benchmarks.transport import call_overhead, measure_transports, relay_mb_s
from orchestrator.config import RunConfig, validate_mapping
from orchestrator.controller import Controller
from orchestrator.data.source import resolve_dataset
from orchestrator.data.stream import BatchStream
from strategies.pipeline.local_learning import BlockSpec, build_block, plan_blocks
from workers.population import ESReplica

CORES = os.cpu_count() or 1
WORKERS = (1, 2, 4)


def pipeline_config(blocks: int, args: argparse.Namespace, root: str) -> dict[str, Any]:
    return {
        "run": {"name": f"scaling-pipe-{blocks}", "seed": 0},
        "strategy": {
            "kind": "pipeline",
            "blocks": blocks,
            "aux_head": "linear",
            "max_in_flight": 2 * blocks,
            "batches_per_step": args.batches_per_step,
            "batches_per_call": args.batches_per_call,
            "optimizer": {"kind": "adam", "lr": 1e-3},
        },
        "model": {"hidden": [args.width] * 4, "norm": "layernorm"},
        "data": {"dataset": "teacher", "size": args.size, "batch_size": args.batch_size},
        "resources": {"cpus_per_worker": 1, "threads_per_worker": 1},
        "tracking": {"enabled": False},
        "checkpoint": {"root": f"{root}/ckpt", "every": 10_000},
        "stop": {"max_steps": args.pipe_steps},
        "eval": {"every": 10_000},
    }


def eggroll_config(workers: int, args: argparse.Namespace, root: str) -> dict[str, Any]:
    return {
        "run": {"name": f"scaling-es-{workers}", "seed": 0},
        "strategy": {
            "kind": "eggroll",
            "population": args.population,
            "rank": 4,
            "sigma": 0.05,
            "optimizer": {"kind": "adam", "lr": 0.01},
            "workers": workers,
            "checksum_every": 1_000,
            "task": {"kind": "classification", "batch_size": args.es_batch},
        },
        "model": {"hidden": [args.width, args.width], "norm": "none"},
        "data": {"dataset": "teacher", "size": args.size, "batch_size": args.batch_size},
        "resources": {"cpus_per_worker": 1, "threads_per_worker": 1},
        "tracking": {"enabled": False},
        "checkpoint": {"root": f"{root}/ckpt", "every": 10_000},
        "stop": {"max_steps": args.es_steps},
        "eval": {"every": 10_000},
    }


def _timed(fn: Any, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_seconds(run: RunConfig, blocks: int, repeats: int) -> list[float]:
    """Each block's train step on one batch, one thread, in this process: the compute
    the cost model gives each stage (the blocks' own code, without Ray)."""
    info = resolve_dataset(run.data)
    x, y = BatchStream(info, "train", run.data.batch_size, run.run.seed).batch(0)
    strategy = run.strategy
    plans = plan_blocks(run.model, info.input, blocks, strategy.aux_head, strategy.aux_depth)
    seconds = []
    for plan in plans:
        spec = BlockSpec(plan, run.model, info.input, run.run.seed, strategy.optimizer, 1e-3)
        block = build_block(spec)
        seconds.append(_timed(lambda block=block, x=x: block.train_step(x, y), repeats))
        x, _ = block.train_step(x, y)
    return seconds


def eggroll_costs(run: RunConfig, call_s: float, repeats: int) -> EggrollCosts:
    """One member's fitness and one update, timed on a replica in this process."""
    cfg = run.strategy
    replica = ESReplica(
        task=cfg.task,
        model=run.model,
        dataset=resolve_dataset(run.data),
        optimizer=cfg.optimizer,
        spec=cfg.noise_spec(),
        shaping=cfg.shaping,
        seed=run.run.seed,
    )
    members = range(cfg.population)
    evaluate = _timed(lambda: replica.fitness(0, members, cfg.sigma), repeats)
    fitness = np.linspace(0.0, 1.0, cfg.population)
    update = _timed(lambda: replica.update(0, fitness, cfg.sigma, 1e-3), repeats)
    return EggrollCosts(evaluate / cfg.population, update, 2 * call_s, cfg.population)


def eggroll_rate(result: Any, population: int) -> float:
    """Members scored per second, the median over every generation but the first."""
    steps = [m for _, m in result.history[1:]]
    return population / statistics.median(population / m["train/members_per_s"] for m in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, < 4 min on 2 cores")
    args = parser.parse_args()
    args.width = 256 if args.quick else 512
    args.size = 12_000 if args.quick else 48_000
    args.batch_size, args.batches_per_step, args.batches_per_call = 256, 10, 5
    args.pipe_steps = (args.size // args.batch_size) // args.batches_per_step
    args.population = 128 if args.quick else 512
    args.es_batch = 128
    args.es_steps = 5 if args.quick else 15
    repeats = 5 if args.quick else 20
    torch.set_num_threads(1)

    ray.init(num_cpus=max(4, CORES), include_dashboard=False, logging_level="ERROR")
    # The object store's costs, as the pipeline pays them: a call through a chain of two
    # actors with several in flight, and the transfer rate of a 2 MB message (large enough
    # that the call it rides on is a small part of its time).
    call_s = call_overhead(2, 200 if args.quick else 1000)["object_store_pipelined_us"] / 1e6
    activation = args.batch_size * args.width
    bytes_per_s = relay_mb_s("object_store", 2**19, 50 if args.quick else 200) * 2**20
    pipe: dict[int, dict[str, Any]] = {}
    es: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as root:
        print("(a) pipeline, one thread per block", flush=True)
        for blocks in WORKERS:
            raw = pipeline_config(blocks, args, root)
            row = measure(f"pipeline K={blocks}", raw)
            costs = PipelineCosts(
                stage_seconds(validate_mapping(raw), blocks, repeats),
                call_s,
                (activation + args.batch_size) * 4,
                bytes_per_s,
                args.batches_per_call,
            )
            row["predicted_samples_per_s"] = args.batch_size / pipeline_batch_s(costs, CORES)
            row["costs"] = costs
            pipe[blocks] = row
        print("(b) EGGROLL, one thread per population worker", flush=True)
        for workers in WORKERS:
            raw = eggroll_config(workers, args, root)
            result = Controller(validate_mapping(raw)).run()
            es[workers] = {"members_per_s": eggroll_rate(result, args.population)}
            print(f"EGGROLL workers={workers}: {es[workers]['members_per_s']:9.0f} members/s")
        es_costs = eggroll_costs(validate_mapping(eggroll_config(1, args, root)), call_s, repeats)
        for workers, row in es.items():
            generation = eggroll_generation_s(es_costs, workers, CORES)
            row["predicted_members_per_s"] = args.population / generation
        print("(d) transports", flush=True)
        transports = measure_transports(args.quick)
    ray.shutdown()
    print("(c) engines", flush=True)
    engines = measure_engine_overhead(args.quick)
    worst_engine = max(engines["engine_overhead"].values())

    pipeline_scaling = [pipe[k]["samples_per_s"] / pipe[1]["samples_per_s"] for k in WORKERS]
    eggroll_scaling = [es[w]["members_per_s"] / es[1]["members_per_s"] for w in WORKERS]
    print(
        f"\n{CORES} cores; pipeline 4x{args.width} MLP, batch {args.batch_size}; EGGROLL "
        f"population {args.population}, 2x{args.width} MLP, rank 4"
    )
    print(
        f"measured costs: actor call {1e6 * call_s:.0f} us, transfer "
        f"{bytes_per_s / 2**20:.0f} MB/s, member {1e6 * es_costs.member_s:.1f} us, "
        f"update {1e3 * es_costs.update_s:.2f} ms"
    )
    print(f"{'run':<22} {'measured':>10} {'vs 1':>6} {'model':>10} {'error':>7}")
    for k in WORKERS:
        row = pipe[k]
        print(
            f"{f'pipeline K={k}':<22} {row['samples_per_s']:10.0f} "
            f"{pipeline_scaling[WORKERS.index(k)]:6.2f} {row['predicted_samples_per_s']:10.0f} "
            f"{relative_error(row['predicted_samples_per_s'], row['samples_per_s']):+7.1%}"
        )
    for w in WORKERS:
        row = es[w]
        print(
            f"{f'EGGROLL workers={w}':<22} {row['members_per_s']:10.0f} "
            f"{eggroll_scaling[WORKERS.index(w)]:6.2f} {row['predicted_members_per_s']:10.0f} "
            f"{relative_error(row['predicted_members_per_s'], row['members_per_s']):+7.1%}"
        )

    overheads = ", ".join(f"{k} {v:.2f}" for k, v in engines["engine_overhead"].items())
    print(f"one block's time per batch against torch: {overheads}")
    print(
        "pipeline time per batch, compiled graph against object store: "
        f"{transports['compiled_vs_object_store']:.2f}"
    )
    print(
        "\ncost model beyond this machine: one block (K = cores) or one population worker per "
        "core, one thread each; a model x times the FLOPs has activations sqrt(x) as wide"
    )
    print(f"{'cores':>6} {'model x':>8} {'pipeline samples/s':>19} {'EGGROLL members/s':>18}")
    extrapolated = []
    measured_pipe = pipe[1]["costs"]
    for cores in (2, 4, 8, 16):
        for factor in (1, 4, 16):
            width_factor = factor**0.5  # FLOPs grow with width squared
            cut = scaled_pipeline(measured_pipe, cores, factor, width_factor)
            pipe_rate = args.batch_size / pipeline_batch_s(cut, cores)
            es_rate = args.population / eggroll_generation_s(
                scaled_eggroll(es_costs, factor), cores, cores
            )
            extrapolated.append(
                {
                    "cores": cores,
                    "compute_factor": factor,
                    "pipeline_samples_per_s": pipe_rate,
                    "eggroll_members_per_s": es_rate,
                }
            )
            print(f"{cores:6d} {factor:8d} {pipe_rate:19.0f} {es_rate:18.0f}")

    for row in pipe.values():
        row.pop("costs")
    print(
        json_line(
            {
                "pipeline_scaling": pipeline_scaling,
                "eggroll_scaling": eggroll_scaling,
                "engine_overhead": worst_engine,
                "engines_run": engines["engines_run"],
                "compiled_vs_object_store": transports["compiled_vs_object_store"],
                "pipeline_runs": {str(k): v for k, v in pipe.items()},
                "eggroll_runs": {str(k): v for k, v in es.items()},
                "engines": engines,
                "transports": transports,
                "cost_model": extrapolated,
                "cores": CORES,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
