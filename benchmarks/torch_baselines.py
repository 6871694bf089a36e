"""What a user writes without the harness: a plain PyTorch loop, and the same loop data
parallel over processes (DistributedDataParallel on gloo, one thread per process).

Both train the run a config describes (same network from the same seed, Adam, the same
batches in the same order, read from the same Parquet files and held in memory before
the clock starts, as a user with a small data set would) and are timed the way the
harness's runs are: every step but the first.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.config import RunConfig, validate_mapping
from orchestrator.data.source import DatasetInfo, resolve_dataset
from orchestrator.data.stream import Batch, BatchStream
from strategies.models.loss import task_loss
from strategies.models.network import build_network


def _batches(run: RunConfig, info: DatasetInfo) -> tuple[list[Batch], list[Batch]]:
    seed, size = run.run.seed, run.data.batch_size
    stream = BatchStream(info, "train", size, seed)
    train = [stream.batch(t) for t in range(run.stop.max_steps * run.strategy.batches_per_step)]
    return train, list(BatchStream(info, "test", size, seed))


def _network(run: RunConfig, info: DatasetInfo) -> torch.nn.Module:
    return build_network(run.model, info.input, run.run.seed)


def _train(
    network: torch.nn.Module, run: RunConfig, batches: list[Batch], part: slice = slice(None)
) -> float:
    """Train on ``batches`` (this process's rows ``part`` of each); seconds after step one."""
    optimizer = torch.optim.Adam(network.parameters(), lr=run.strategy.optimizer.lr)
    per_step = run.strategy.batches_per_step
    timed = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        if i == per_step:
            timed = time.perf_counter()
        loss = task_loss(network(x[part]), y[part]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - timed


@torch.no_grad()
def _accuracy(network: torch.nn.Module, test: list[Batch]) -> float:
    network.eval()
    scored = [task_loss(network(x), y) for x, y in test]
    return float(sum(s.hits for s in scored)) / sum(s.count for s in scored)


def _row(name: str, accuracy: float, samples_per_s: float, start: float) -> dict[str, Any]:
    print(f"{name:<28} acc {accuracy:.4f}  {samples_per_s:9.0f} samples/s", flush=True)
    return {
        "name": name,
        "accuracy": accuracy,
        "samples_per_s": samples_per_s,
        "peak_mb_per_worker": float("nan"),
        "wall_s": time.perf_counter() - start,
        "mean_busy_fraction": float("nan"),
    }


def _timed_samples(run: RunConfig, batches: list[Batch]) -> int:
    return (len(batches) - run.strategy.batches_per_step) * run.data.batch_size


def plain_loop(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """One process, one torch thread: the loop every PyTorch tutorial writes."""
    start = time.perf_counter()
    run = validate_mapping(config)
    info = resolve_dataset(run.data)
    batches, test = _batches(run, info)
    network = _network(run, info)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = _train(network, run, batches)
        accuracy = _accuracy(network, test)
    finally:
        torch.set_num_threads(threads)
    return _row(name, accuracy, _timed_samples(run, batches) / seconds, start)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int,
    world: int,
    port: int,
    run: RunConfig,
    info: DatasetInfo,
    batches: list[Batch],
    out: Any,
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        network = torch.nn.parallel.DistributedDataParallel(_network(run, info))
        share = run.data.batch_size // world
        seconds = _train(network, run, batches, slice(rank * share, (rank + 1) * share))
        if rank == 0:
            # As NumPy: a torch tensor would travel as a handle into this process's memory,
            # gone once it exits.
            out.put((seconds, {k: v.numpy() for k, v in network.module.state_dict().items()}))
    finally:
        dist.destroy_process_group()


def data_parallel(name: str, config: dict[str, Any], world: int) -> dict[str, Any]:
    """``world`` processes of one thread each, each on its share of every batch, gradients
    averaged by DDP: the same updates as one process on the whole batch."""
    start = time.perf_counter()
    run = validate_mapping(config)
    if run.data.batch_size % world:
        raise ValueError(f"batch size {run.data.batch_size} does not split over {world} ranks")
    info = resolve_dataset(run.data)
    batches, test = _batches(run, info)
    context = mp.get_context("spawn")
    out, port = context.SimpleQueue(), _free_port()
    ranks = [
        context.Process(target=_rank_main, args=(r, world, port, run, info, batches, out))
        for r in range(world)
    ]
    for rank in ranks:
        rank.start()
    seconds, state = out.get()
    for rank in ranks:
        rank.join()
    network = _network(run, info)
    network.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return _row(name, _accuracy(network, test), _timed_samples(run, batches) / seconds, start)
