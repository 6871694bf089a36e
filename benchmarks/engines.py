"""Engine overhead: one pipeline block trained under plain torch, Accelerate and DeepSpeed.

    python -m benchmarks.engines [--quick]

The same block (the first of a 2-block cut of a 4 x 512 MLP with LayerNorm, its linear
head and Adam, the pipeline example's network), built from the same seed, trains the
same batches in this one process, one torch thread, under each engine in turn: plain
torch, Accelerate (fp32 and bf16) and DeepSpeed ZeRO stage 1 and 2. Building an engine
(DeepSpeed's first one compiles its comm op) and a few warm-up batches are not timed;
the timed rounds interleave the engines so drift hits them all alike, and each engine's
figure is its median round. ``engine_overhead`` is an engine's time per batch over plain
torch's (1.0: no overhead). An engine that cannot start here is left out, its error under
``skipped``. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.report import json_line
from orchestrator.config import EngineConfig
from orchestrator.data.spec import InputSpec
from strategies.config import ModelConfig, OptimizerConfig
from strategies.pipeline.local_learning import BlockSpec, LocalBlock, build_block, plan_blocks

ENGINES: dict[str, dict[str, Any]] = {
    "torch": {"kind": "torch"},
    "accelerate": {"kind": "accelerate"},
    "accelerate-bf16": {"kind": "accelerate", "precision": "bf16"},
    "deepspeed": {"kind": "deepspeed", "zero_stage": 1},
    "deepspeed-zero2": {"kind": "deepspeed", "zero_stage": 2},
}
INPUT = InputSpec("table", (64,), 10)  # the teacher set's shape
MODEL = ModelConfig(hidden=[512] * 4, norm="layernorm")


def build(engine: dict[str, Any]) -> LocalBlock:
    plan = plan_blocks(MODEL, INPUT, blocks=2, aux_head="linear", aux_depth=1)[0]
    spec = BlockSpec(plan, MODEL, INPUT, 0, OptimizerConfig(), 1e-3, engine=EngineConfig(**engine))
    return build_block(spec)


def batches(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, *INPUT.shape, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(count)
    ]


def timed_round(block: LocalBlock, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for x, y in data:
        block.train_step(x, y)
    return time.perf_counter() - start


def measure_engine_overhead(quick: bool) -> dict[str, Any]:
    """Samples per second of one block under each engine, and each one's time per batch
    over plain torch's (``engine_overhead``); ``engines_run`` names those that started."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a pipeline block's share: one thread per actor
    size, per_round, rounds = (128, 10, 3) if quick else (512, 20, 5)
    data = batches(per_round, size)
    blocks: dict[str, LocalBlock] = {}
    skipped: dict[str, str] = {}
    try:
        for name, engine in ENGINES.items():
            try:
                blocks[name] = build(engine)
            except Exception as err:  # noqa: BLE001 - an engine this machine cannot start
                skipped[name] = f"{type(err).__name__}: {err}"
                continue
            timed_round(blocks[name], data[:3])  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in blocks}
        for _ in range(rounds):
            for name, block in blocks.items():
                seconds[name].append(timed_round(block, data))
    finally:
        torch.set_num_threads(threads)
    samples = per_round * size
    rate = {name: samples / statistics.median(s) for name, s in seconds.items()}
    return {
        "samples_per_s": rate,
        "engine_overhead": {name: rate["torch"] / r for name, r in rate.items() if name != "torch"},
        "engines_run": list(rate),
        "skipped": skipped,
        "batch_size": size,
        "batches_per_round": per_round,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few rounds")
    figures = measure_engine_overhead(parser.parse_args().quick)
    print(f"{'engine':<18}{'samples/s':>12}{'time vs torch':>15}")
    for name, rate in figures["samples_per_s"].items():
        overhead = figures["engine_overhead"].get(name, 1.0)
        print(f"{name:<18}{rate:>12.0f}{overhead:>15.2f}")
    for name, error in figures["skipped"].items():
        print(f"{name:<18} not run: {error}")
    print(json_line(figures))


if __name__ == "__main__":
    main()
