"""Training instances generated while training runs, kept in a bounded buffer of shards.

After Meyer et al., "Training Deep Surrogate Models with Large Scale Online Learning"
(ICML 2023; the Melissa framework): solvers run beside the trainer and stream new instances
into a memory buffer, and the trainer draws every batch from what the buffer holds. Of the
buffer policies the paper weighs, this is its *Reservoir*:

* training starts once the buffer holds a threshold of samples (``warmup_shards``) and
  from then on never waits: a batch is drawn from the buffer as it is, however far the
  solvers are behind; the buffer never shrinks, so once warm it stays warm;
* batches are drawn uniformly from the whole buffer, old and new entries alike;
* a full buffer admits a new shard only by evicting one whose every instance was trained
  on at least once, chosen at random among those. A solve costs seconds, so no instance
  is thrown away unseen; and when none is evictable the new shard waits, and so do the
  solvers (a bounded number of requests is outstanding): generation slows to the pace of
  training instead of filling storage.

A first-in-first-out window would evict the oldest shard whether or not it was trained
on, wasting solves whenever the solvers outpace the trainer, and would train only on the
newest instances; with solves that cost 30 ms to seconds each, the reservoir's rule wins.

The unit is a shard of ``instances_per_shard`` instances (one Parquet file), so that the
buffer on an object store is a few files, not one object per instance. Instance ``i`` is a
pure function of (``data_seed``, ``i``): its features come from a generator seeded by both,
never from a shared stream, so whichever solver makes it, whenever, it is the same, and a
run that records the ids it trained on (``OnlineInstances.seen``) can regenerate exactly
what it saw. What the buffer holds when a batch is drawn depends on how fast the solvers
ran, so the ids are recorded per batch and checkpointed, with the buffer, for resuming.

No Ray here: ``OnlineInstances`` asks a ``ShardSource`` for shards; ``workers.pde_generator``
provides one over solver actors, the tests one in process.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import Tensor

from orchestrator.data import files
from strategies.moe_hc.pde import shards

if TYPE_CHECKING:
    from strategies.moe_hc.pde.configs import OnlineDataConfig
    from strategies.moe_hc.pde.problems import PDEProblem

ONLINE_STREAM = 2  # seed stream of online instances; 0 and 1 are the stored train and test sets
_EVICTION_STREAM = 3
SHARD_PREFIX = "shard-"


# -- instances as a pure function of their id -------------------------------------------------
def instance_features(problem: PDEProblem, data_seed: int, ids: np.ndarray) -> np.ndarray:
    """Features (n, f) of online instances ``ids``, each drawn by its own seeded generator."""
    rows = [
        problem.sample_features(np.random.default_rng([data_seed, ONLINE_STREAM, int(i)]), 1)
        for i in ids
    ]
    return np.concatenate(rows).astype(np.float32)


def regenerate(
    problem: PDEProblem, data_seed: int, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, f), solutions (n, G) float32) of online instances ``ids``: what a solver
    actor wrote for them, recomputed (the reference solvers are deterministic)."""
    features = instance_features(problem, data_seed, ids)
    solutions = problem.reference(features).astype(np.float32)
    return features, solutions.reshape(len(ids), -1)


def shard_ids(shard: int, per_shard: int) -> np.ndarray:
    return np.arange(shard * per_shard, (shard + 1) * per_shard, dtype=np.int64)


def shard_location(directory: str, shard: int) -> str:
    return files.join(directory, f"{SHARD_PREFIX}{shard:09d}.parquet")


def generate_shard(
    problem: PDEProblem, data_seed: int, directory: str, shard: int, per_shard: int
) -> None:
    """Solve shard ``shard``'s instances and write them, whole or not at all, to the buffer."""
    ids = shard_ids(shard, per_shard)
    features, solutions = regenerate(problem, data_seed, ids)
    meta = {"problem": problem.config.kind, "shard": shard}
    shards.write_shard(shard_location(directory, shard), ids, features, solutions, meta)


# -- the buffer policy -----------------------------------------------------------------------
class Reservoir:
    """Which shards the buffer holds and how often each instance was drawn (Melissa's
    Reservoir, per shard): no data, only bookkeeping, so it is cheap to checkpoint."""

    def __init__(self, capacity: int, per_shard: int) -> None:
        self.capacity, self.per_shard = capacity, per_shard
        self.draws: dict[int, np.ndarray] = {}  # shard -> draws of each of its instances

    @property
    def instances(self) -> int:
        return len(self.draws) * self.per_shard

    def _evictable(self) -> list[int]:
        return sorted(s for s, counts in self.draws.items() if counts.min() > 0)

    def has_room(self) -> bool:
        return len(self.draws) < self.capacity or bool(self._evictable())

    def add(self, shard: int, rng: np.random.Generator) -> int | None:
        """Admit ``shard``; the shard it evicts, if the buffer was full. ValueError if the
        buffer is full of shards not yet trained on (check ``has_room`` first)."""
        evicted = None
        if len(self.draws) >= self.capacity:
            candidates = self._evictable()
            if not candidates:
                raise ValueError("the buffer is full and no shard in it was trained on yet")
            evicted = candidates[int(rng.integers(len(candidates)))]
            del self.draws[evicted]
        self.draws[shard] = np.zeros(self.per_shard, dtype=np.int64)
        return evicted

    def ids(self) -> np.ndarray:
        """Every instance id in the buffer, ascending: draws do not depend on arrival order."""
        return np.concatenate([shard_ids(s, self.per_shard) for s in sorted(self.draws)])

    def draw(self, count: int, generator: torch.Generator) -> np.ndarray:
        """``count`` distinct instances, uniformly from the whole buffer; counted as drawn."""
        ids = self.ids()
        if count > len(ids):
            raise ValueError(
                f"a batch of {count} instances from a buffer of {len(ids)}: raise "
                "online.warmup_shards or online.instances_per_shard, or lower "
                "instances_per_batch"
            )
        chosen = ids[torch.randperm(len(ids), generator=generator)[:count].numpy()]
        for i in chosen:
            self.draws[int(i) // self.per_shard][int(i) % self.per_shard] += 1
        return chosen

    def state(self) -> dict[str, Tensor]:
        shards_held = sorted(self.draws)
        draws = [self.draws[s] for s in shards_held]
        return {
            "shards": torch.tensor(shards_held, dtype=torch.int64),
            "draws": torch.tensor(np.array(draws).reshape(len(shards_held), self.per_shard)),
        }

    def load(self, state: dict[str, Tensor]) -> None:
        self.draws = {
            int(s): d.numpy().astype(np.int64).copy()
            for s, d in zip(state["shards"], state["draws"])
        }


# -- the trainer's side ----------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratedShard:
    """A shard a solver finished writing, which solver made it, and that solver's seconds
    spent solving and alive so far, both on its own clock: between two of its reports the
    busy fraction is their ratio of differences, with no clocks to synchronise and no part
    missed while a shard was still being solved or not yet collected."""

    shard: int
    generator: int
    busy_s: float
    alive_s: float


class ShardSource(Protocol):
    """Solvers that generate shards on request (``workers.pde_generator.GeneratorPool``)."""

    capacity: int  # requests worth keeping outstanding to keep every solver busy

    def submit(self, shard: int) -> None: ...

    def completed(self, timeout: float | None) -> list[GeneratedShard]:
        """Shards finished since the last call; waits up to ``timeout`` seconds (None: until
        one is) when none is."""
        ...


class OnlineInstances:
    """The batches of an online run: a ``Reservoir`` over shards that a ``ShardSource``
    writes to ``directory``, the shards' data in memory, and the record of what each batch
    drew. ``next_batch`` is all a trainer calls; ``state``/``load`` go in its checkpoint."""

    def __init__(
        self,
        problem: PDEProblem,
        settings: OnlineDataConfig,
        data_seed: int,
        directory: str,
        source: ShardSource,
        seed: int,
    ) -> None:
        self.problem, self.settings, self.data_seed = problem, settings, data_seed
        self.directory, self.source, self.seed = directory, source, seed
        self.reservoir = Reservoir(settings.buffer_shards, settings.instances_per_shard)
        self.data: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> features, solutions
        self.next_shard = 0  # the next shard never requested
        self.outstanding: set[int] = set()  # requested, not yet finished
        self.finished: deque[int] = deque()  # finished, waiting for room in the buffer
        self.backlog: deque[int] = deque()  # to request again (after a restore)
        self.log: list[tuple[int, np.ndarray]] = []  # (batch, instance ids) per batch drawn
        self.trained_on: set[int] = set()  # every instance id drawn so far
        self.started = False
        self.counters = {"generated": 0, "evicted": 0, "waits": 0, "wait_s": 0.0, "read_s": 0.0}
        # Per solver: its newest report (busy_s, alive_s), the one the last stats() used,
        # and the busy fraction between the two.
        self.reports: dict[int, tuple[float, float]] = {}
        self.reported: dict[int, tuple[float, float]] = {}
        self.busy: dict[int, float] = {}

    # -- filling the buffer ------------------------------------------------------------
    def _request(self) -> None:
        """Keep ``source.capacity`` shards requested or waiting for room, no more: once the
        buffer cannot admit what is finished, the solvers are left idle."""
        while len(self.outstanding) + len(self.finished) < self.source.capacity:
            if self.backlog:
                shard = self.backlog.popleft()
            else:
                shard, self.next_shard = self.next_shard, self.next_shard + 1
            self.source.submit(shard)
            self.outstanding.add(shard)

    def _collect(self, timeout: float | None) -> None:
        for done in self.source.completed(timeout):
            if done.shard not in self.outstanding:
                continue  # requested before a ``load`` replaced this buffer's state
            self.outstanding.discard(done.shard)
            self.finished.append(done.shard)
            self.reports[done.generator] = (done.busy_s, done.alive_s)
            self.counters["generated"] += self.settings.instances_per_shard

    def _read(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """A shard's data from storage; solved here again if it is missing or not the
        instances it should hold (a shard is a pure function of its ids)."""
        start = time.perf_counter()
        expected = shard_ids(shard, self.settings.instances_per_shard)
        location = shard_location(self.directory, shard)
        try:
            ids, features, solutions, _ = shards.read_shard(location)
            valid = np.array_equal(ids, expected)
        except (FileNotFoundError, ValueError):
            valid = False
        if not valid:
            generate_shard(self.problem, self.data_seed, self.directory, shard, len(expected))
            _, features, solutions, _ = shards.read_shard(location)
        self.counters["read_s"] += time.perf_counter() - start
        return features.copy(), solutions.reshape(len(expected), -1).copy()

    def _admit(self) -> None:
        while self.finished and self.reservoir.has_room():
            shard = self.finished.popleft()
            self.data[shard] = self._read(shard)
            rng = np.random.default_rng([self.seed, _EVICTION_STREAM, shard])
            evicted = self.reservoir.add(shard, rng)
            if evicted is not None:
                del self.data[evicted]
                self._delete(evicted)
                self.counters["evicted"] += 1

    def _delete(self, shard: int) -> None:
        fs, path = files.resolve(shard_location(self.directory, shard))
        if files.exists(fs, path):
            fs.delete_file(path)

    def _remove_strays(self) -> None:
        """Delete the shard files the buffer does not hold (a previous run's, or ones
        finished but not admitted before a restart, which are requested again): the
        storage holds at most the buffer plus what is requested."""
        fs, path = files.resolve(self.directory)
        held = {shard_location(self.directory, s).rsplit("/", 1)[1] for s in self.data}
        for entry in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            name = entry.base_name
            stray = name.startswith(SHARD_PREFIX) and name not in held
            if entry.type == pafs.FileType.File and stray:
                fs.delete_file(entry.path)

    @property
    def warm(self) -> bool:
        return len(self.reservoir.draws) >= self.settings.warmup_shards

    # -- what a trainer calls ------------------------------------------------------------
    def next_batch(
        self, t: int, count: int, generator: torch.Generator
    ) -> tuple[np.ndarray, Tensor, Tensor]:
        """(ids, features (count, f), solutions (count, G)) of batch ``t``, drawn with
        ``generator`` from the buffer as the previous batch left it; waits only until the
        buffer is first warm. Shards finished meanwhile are admitted after the draw, so a
        batch depends on nothing a checkpoint between two batches does not hold: a resumed
        run draws the batch the interrupted one would have drawn."""
        if not self.started:
            self._remove_strays()
            self._request()
            self.started = True
        while not self.warm:
            start = time.perf_counter()
            self._collect(timeout=None)
            self.counters["waits"] += 1
            self.counters["wait_s"] += time.perf_counter() - start
            self._admit()
            self._request()
        ids = self.reservoir.draw(count, generator)
        self.log.append((t, ids))
        self.trained_on.update(int(i) for i in ids)
        per = self.settings.instances_per_shard
        rows = [self.data[int(i) // per] for i in ids]
        features = np.stack([f[int(i) % per] for (f, _), i in zip(rows, ids)])
        solutions = np.stack([s[int(i) % per] for (_, s), i in zip(rows, ids)])
        self._collect(timeout=0)
        self._admit()
        self._request()
        return ids, torch.from_numpy(features), torch.from_numpy(solutions)

    def seen(self) -> tuple[np.ndarray, np.ndarray]:
        """(batches (n,), ids (n, instances per batch)): what every batch drawn trained on."""
        if not self.log:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.int64)
        return np.array([t for t, _ in self.log]), np.stack([ids for _, ids in self.log])

    def stats(self) -> dict[str, float]:
        """Metrics since the last call: the trainer's waits and reads, the buffer, and each
        solver's busy fraction since the report the last call used (unchanged while it has
        reported nothing new: a solver left idle reports once it works again, and the
        idle time then lowers its fraction)."""
        c = self.counters
        metrics = {
            "system/online_waits": float(c["waits"]),
            "system/online_wait_s": c["wait_s"],
            "system/online_read_s": c["read_s"],
            "system/online_buffer_instances": float(self.reservoir.instances),
            "system/online_instances_generated": float(c["generated"]),
            "system/online_shards_evicted": float(c["evicted"]),
            "train/online_instances_seen": float(len(self.trained_on)),
        }
        for k, (busy_s, alive_s) in self.reports.items():
            before_busy, before_alive = self.reported.get(k, (0.0, 0.0))
            if alive_s > before_alive:
                self.busy[k] = min(1.0, (busy_s - before_busy) / (alive_s - before_alive))
                self.reported[k] = (busy_s, alive_s)
        for k in range(self.settings.generators):
            metrics[f"generator-{k}/system/busy_fraction"] = self.busy.get(k, 0.0)
        c["waits"], c["wait_s"], c["read_s"] = 0, 0.0, 0.0
        return metrics

    def state(self) -> dict[str, Any]:
        batches, ids = self.seen()
        requested = sorted(self.outstanding | set(self.finished) | set(self.backlog))
        return {
            "reservoir": self.reservoir.state(),
            "next_shard": self.next_shard,
            "requested": torch.tensor(requested, dtype=torch.int64),
            "seen_batches": torch.from_numpy(batches),
            "seen_ids": torch.from_numpy(ids),
            "generated": self.counters["generated"],
            "evicted": self.counters["evicted"],
        }

    def load(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: the same buffer (its shards read back from storage,
        or solved again where missing), the same record, and the shards that were requested
        then requested again before any new one."""
        self.reservoir.load(state["reservoir"])
        self.data = {s: self._read(s) for s in sorted(self.reservoir.draws)}
        self.next_shard = int(state["next_shard"])
        self.outstanding, self.finished = set(), deque()
        self.backlog = deque(int(s) for s in state["requested"])
        ids = state["seen_ids"].numpy()
        self.log = [(int(t), ids[k]) for k, t in enumerate(state["seen_batches"].numpy())]
        self.trained_on = {int(i) for i in ids.ravel()}
        self.counters["generated"] = int(state["generated"])
        self.counters["evicted"] = int(state["evicted"])
        self.started = False
