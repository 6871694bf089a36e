"""The pipeline's two transports side by side: Ray's object store and Ray Compiled Graphs.

    python -m benchmarks.transport [--quick]

(a) Per-batch overhead: a chain of 2 and of 4 pass-through actors (no compute), one small
message per call, through each transport (``strategies.pipeline.transport``): chained
``.remote()`` calls against one compiled graph. "latency" waits for each call before the
next; "pipelined" keeps ``IN_FLIGHT`` calls in the chain, as the pipeline's driver does.
(b) Activation throughput: one actor hands another an activation-sized float32 tensor in
the pipeline's wire format (``workers.messages``), through each transport, in MB/s against
an in-process ``copy_`` of the same tensor.
(c) The real pipeline: ``benchmarks.pipeline``'s small case (4x256 MLP, batch 128, K = 2
blocks, augmented heads of depth 1, one thread per block) through the Controller with each
transport; ``compiled_vs_object_store`` is the compiled graph's time per batch over the
object store's, with the driver's CPU time per batch beside it (a compiled graph's reader
waits by spinning).
(d) On a machine with two GPUs or more: device-to-device bandwidth between two GPU actors
through a compiled graph's NCCL edge, through the host (the object store), and a plain
``copy_`` between two devices in one process. Skipped without them.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import deque
from typing import Any

import ray
import torch

from benchmarks.pipeline import run_config, throughput
from benchmarks.report import json_line
from orchestrator.config import validate_mapping
from orchestrator.controller import Controller
from strategies.pipeline.config import TransportKind
from strategies.pipeline.transport import Transport, open_transport
from workers.messages import from_wire, on_device, to_wire

CORES = os.cpu_count() or 1
KINDS: tuple[TransportKind, ...] = ("object_store", "compiled_graph")
IN_FLIGHT = 4


class PassThrough:
    """One hop of a chain: returns its message untouched."""

    def forward(self, message: Any) -> Any:
        return message


class Relay:
    """Makes an activation (given its size) or consumes one (given an array): a transfer's
    two ends in one method, so both ends can sit in one chain."""

    def __init__(self, device: str = "cpu", wire_on_device: bool = False) -> None:
        self.device = device
        self.wire = on_device if wire_on_device else to_wire
        self.activation: torch.Tensor | None = None

    def forward(self, message: Any) -> Any:
        if isinstance(message, int):
            if self.activation is None or self.activation.numel() != message:
                self.activation = torch.randn(message, device=self.device)
            return self.wire(self.activation)
        return from_wire(message).to(self.device).numel()


def calls_per_s(transport: Transport, message: Any, calls: int, in_flight: int) -> float:
    """Calls completed per second with at most ``in_flight`` in the chain."""
    pending: deque[Any] = deque()
    start = time.perf_counter()
    for _ in range(calls):
        pending.append(transport.submit(message))
        while len(pending) >= in_flight:
            transport.receive(pending.popleft())
    while pending:
        transport.receive(pending.popleft())
    return calls / (time.perf_counter() - start)


def chain_calls_per_s(
    kind: TransportKind, actors: list[Any], device: str, message: Any, calls: int, in_flight: int
) -> float:
    """``calls_per_s`` through ``actors`` once the transport is warm (a compiled graph's
    first calls set its channels up and size their buffers); the actors are killed after."""
    transport = open_transport(kind, actors, IN_FLIGHT, device)
    try:
        calls_per_s(transport, message, 3, 1)
        return calls_per_s(transport, message, calls, in_flight)
    finally:
        transport.close()
        for actor in actors:
            ray.kill(actor)


def call_overhead(chain: int, calls: int) -> dict[str, float]:
    """Microseconds per call through ``chain`` pass-through actors, per transport and mode."""
    out: dict[str, float] = {}
    for kind in KINDS:
        for mode, in_flight in (("latency", 1), ("pipelined", IN_FLIGHT)):
            actors = [ray.remote(num_cpus=0)(PassThrough).remote() for _ in range(chain)]
            rate = chain_calls_per_s(kind, actors, "cpu", (0, 1), calls, in_flight)
            out[f"{kind}_{mode}_us"] = 1e6 / rate
    return out


def local_copy_mb_s(numel: int, repeats: int, source: str = "cpu", target: str = "cpu") -> float:
    src = torch.randn(numel, device=source)
    dst = torch.empty(numel, device=target)
    dst.copy_(src)
    synchronize = torch.cuda.synchronize if "cuda" in (source + target) else lambda: None
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize()
    return numel * 4 / 2**20 * repeats / (time.perf_counter() - start)


def relay_mb_s(kind: TransportKind, numel: int, repeats: int, gpu: bool = False) -> float:
    """One tensor of ``numel`` float32 from one actor to the next, ``repeats`` times."""
    options: dict[str, Any] = {"num_cpus": 0, "num_gpus": 1} if gpu else {"num_cpus": 0}
    nccl = gpu and kind == "compiled_graph"
    device = "cuda" if gpu else "cpu"
    actors = [ray.remote(**options)(Relay).remote(device, nccl) for _ in range(2)]
    rate = chain_calls_per_s(kind, actors, "cuda" if nccl else "cpu", numel, repeats, IN_FLIGHT)
    return rate * numel * 4 / 2**20


def bandwidth(shapes: list[tuple[int, int]], repeats: int) -> list[dict[str, Any]]:
    """Every in-process copy first: actors just killed may still spin on the cores."""
    rows = [
        {
            "shape": [r, c],
            "mb": r * c * 4 / 2**20,
            "local_copy_mb_s": local_copy_mb_s(r * c, repeats),
        }
        for r, c in shapes
    ]
    for row in rows:
        numel = row["shape"][0] * row["shape"][1]
        for kind in KINDS:
            row[f"{kind}_mb_s"] = relay_mb_s(kind, numel, repeats)
            row[f"{kind}_vs_local_copy"] = row[f"{kind}_mb_s"] / row["local_copy_mb_s"]
    return rows


def gpu_bandwidth(shapes: list[tuple[int, int]], repeats: int) -> list[dict[str, Any]]:
    """Two GPU actors, one GPU each: NCCL in a compiled graph, the host through the object
    store, and an in-process ``copy_`` from cuda:0 to cuda:1."""
    rows = []
    for rows_, cols in shapes:
        numel = rows_ * cols
        row: dict[str, Any] = {"shape": [rows_, cols], "mb": numel * 4 / 2**20}
        row["device_copy_mb_s"] = local_copy_mb_s(numel, repeats, "cuda:0", "cuda:1")
        row["nccl_mb_s"] = relay_mb_s("compiled_graph", numel, repeats, gpu=True)
        row["host_mb_s"] = relay_mb_s("object_store", numel, repeats, gpu=True)
        row["nccl_vs_device_copy"] = row["nccl_mb_s"] / row["device_copy_mb_s"]
        row["nccl_vs_host"] = row["nccl_mb_s"] / row["host_mb_s"]
        rows.append(row)
    return rows


def pipeline_runs(quick: bool, data_root: str) -> dict[str, dict[str, float]]:
    """``benchmarks.pipeline``'s small case with each transport: seconds per batch (every
    step but the first), the driver's CPU seconds per batch, blocks' busy fraction."""
    args = argparse.Namespace(
        batches_per_step=20,
        lr=1e-3,
        width=256,
        layers=4,
        size=12_000 if quick else 24_000,
        batch_size=128,
        data_root=data_root,
    )
    args.steps = 2 * (args.size // args.batch_size) // args.batches_per_step
    runs: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for kind in KINDS:
            strategy = {"kind": "pipeline", "blocks": 2, "aux_head": "augmented"}
            config = run_config({**strategy, "aux_depth": 1, "transport": kind}, 1, args, root)
            cpu = time.process_time()
            result = Controller(validate_mapping(config)).run()
            cpu = time.process_time() - cpu
            batches = args.steps * args.batches_per_step
            busy = [
                statistics.fmean(m[k] for _, m in result.history[1:])
                for k in result.history[-1][1]
                if k.endswith("/system/busy_fraction")
            ]
            runs[kind] = {
                "s_per_batch": args.batch_size / throughput(result),
                "driver_cpu_s_per_batch": cpu / batches,
                "mean_busy_fraction": statistics.fmean(busy),
                "accuracy": result.metrics["eval/accuracy"],
            }
    return runs


def measure_transports(quick: bool, data_root: str = ".unlocked/datasets") -> dict[str, Any]:
    """Every figure of this benchmark; starts (and ends) a local Ray unless one is up."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(4, CORES), include_dashboard=False, logging_level="ERROR")
    try:
        shapes = [(128, 1024), (512, 1024)] + ([] if quick else [(2048, 1024)])
        moved = bandwidth(shapes, 50 if quick else 200)
        calls = 200 if quick else 1000
        overhead = {f"chain_{n}": call_overhead(n, calls) for n in (2, 4)}
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        on_gpus = gpu_bandwidth(shapes + [(8192, 1024)], 100) if gpus >= 2 else None
        runs = pipeline_runs(quick, data_root)
    finally:
        if started:
            ray.shutdown()
    compiled, store = runs["compiled_graph"], runs["object_store"]
    return {
        "call_overhead": overhead,
        "bandwidth": moved,
        "gpu_bandwidth": on_gpus,
        "pipeline": runs,
        "compiled_vs_object_store": compiled["s_per_batch"] / store["s_per_batch"],
        "cores": CORES,
        "quick": quick,
    }


def report(figures: dict[str, Any]) -> None:
    print(f"{CORES} cores; per-call overhead of a chain of pass-through actors, us per call")
    print(f"{'chain':<8} {'transport':<15} {'latency':>9} {'pipelined':>10}")
    for chain, row in figures["call_overhead"].items():
        for kind in KINDS:
            print(
                f"{chain:<8} {kind:<15} {row[f'{kind}_latency_us']:9.0f} "
                f"{row[f'{kind}_pipelined_us']:10.0f}"
            )
    print(f"\nactivation actor -> actor, MB/s (in-process copy_ beside; {IN_FLIGHT} in flight)")
    print(f"{'shape':<12} {'MB':>6} {'copy_':>8} {'store':>8} {'compiled':>9}")
    for row in figures["bandwidth"]:
        print(
            f"{'x'.join(map(str, row['shape'])):<12} {row['mb']:6.2f} "
            f"{row['local_copy_mb_s']:8.0f} {row['object_store_mb_s']:8.0f} "
            f"{row['compiled_graph_mb_s']:9.0f}"
        )
    if figures["gpu_bandwidth"] is None:
        print("\nGPU device-to-device bandwidth: skipped (needs two GPUs)")
    else:
        print(f"\n{'shape':<12} {'MB':>6} {'copy_ 0->1':>11} {'NCCL':>8} {'host':>8}")
        for row in figures["gpu_bandwidth"]:
            print(
                f"{'x'.join(map(str, row['shape'])):<12} {row['mb']:6.2f} "
                f"{row['device_copy_mb_s']:11.0f} {row['nccl_mb_s']:8.0f} {row['host_mb_s']:8.0f}"
            )
    print("\npipeline, small case (4x256 MLP, batch 128, K=2 augmented d1)")
    print(f"{'transport':<15} {'ms/batch':>9} {'driver cpu ms/batch*':>20} {'busy':>5} {'acc':>7}")
    for kind, row in figures["pipeline"].items():
        print(
            f"{kind:<15} {1e3 * row['s_per_batch']:9.2f} "
            f"{1e3 * row['driver_cpu_s_per_batch']:20.2f} {row['mean_busy_fraction']:5.2f} "
            f"{row['accuracy']:7.4f}"
        )
    print("* the driver's CPU time over the whole run (set-up, evaluation included) / batches")
    ratio = figures["compiled_vs_object_store"]
    print(f"compiled graph vs object store, time per batch: {ratio:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, < 2 min on 2 cores")
    parser.add_argument("--data-root", default=".unlocked/datasets")
    args = parser.parse_args()
    figures = measure_transports(args.quick, args.data_root)
    report(figures)
    print(json_line(figures))


if __name__ == "__main__":
    main()
