"""PDEGeneratorWorker: a solver actor that writes online PDE instances while training runs.

A thin shell around ``strategies.moe_hc.pde.online.generate_shard``: asked for shard k, it
solves k's instances with the problem's reference solver and writes them as one Parquet
file into the run's buffer. ``GeneratorPool`` is the trainer's ``ShardSource`` over these
actors: only shard numbers go out and small records come back; the data itself travels
through storage, where the buffer lives and where a restarted run finds it again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch

from strategies.moe_hc.pde.configs import ProblemConfig
from strategies.moe_hc.pde.online import GeneratedShard, generate_shard
from strategies.moe_hc.pde.problems import build_problem
from workers.telemetry import BusyTimeline

# Requests queued per actor: with two, an actor starts its next shard the moment it ends
# one, instead of idling for the trainer's next poll and the round trip of a new request.
REQUESTS_PER_GENERATOR = 2


class PDEGeneratorWorker:
    def __init__(self, problem: ProblemConfig, directory: str, index: int, threads: int) -> None:
        if problem.online is None:
            raise ValueError("a PDE generator needs strategy.problem.online to be set")
        torch.set_num_threads(threads)
        self.config, self.problem = problem, build_problem(problem)
        self.directory, self.index = directory, index
        self.timeline = BusyTimeline()
        self.born, self.busy_s = time.perf_counter(), 0.0

    def pid(self) -> int:
        return os.getpid()

    def generate(self, shard: int) -> GeneratedShard:
        start = time.perf_counter()
        with self.timeline.busy():
            per_shard = self.config.online.instances_per_shard
            generate_shard(self.problem, self.config.data_seed, self.directory, shard, per_shard)
        end = time.perf_counter()
        self.busy_s += end - start
        return GeneratedShard(shard, self.index, self.busy_s, end - self.born)

    def spans(self) -> list[tuple[float, float]]:
        return list(self.timeline.spans)

    def peak_training_bytes(self) -> int | None:
        return None  # it trains nothing: a solver's memory is NumPy's, not a step's tensors


class GeneratorPool:
    """``OnlineInstances``' source of shards: each request goes to the actor with the fewest
    queued, and finished ones are collected with ``ray.wait``. A dead actor's error surfaces
    from ``completed``, so the trainer's step fails and the controller recovers the run."""

    def __init__(self, generators: Sequence[Any]) -> None:
        self.generators = list(generators)
        self.capacity = REQUESTS_PER_GENERATOR * len(self.generators)
        self.queued = [0] * len(self.generators)
        self.requests: dict[ray.ObjectRef, int] = {}  # request -> its actor

    def submit(self, shard: int) -> None:
        k = min(range(len(self.generators)), key=self.queued.__getitem__)
        self.requests[self.generators[k].generate.remote(shard)] = k
        self.queued[k] += 1

    def completed(self, timeout: float | None) -> list[GeneratedShard]:
        pending = list(self.requests)
        if not pending:
            if timeout is None:
                raise RuntimeError("waiting for a generated shard, but none was requested")
            return []
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout)
        if ready:  # take every other one finished by now too
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        for ref in ready:
            self.queued[self.requests.pop(ref)] -= 1
        return ray.get(ready)
