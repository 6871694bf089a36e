"""BlockWorker: one pipeline block on one Ray actor.

A thin shell around ``strategies.pipeline.local_learning.LocalBlock``: it receives a few
batches' activations (or, as the first block, reads its own batches), updates on its local
loss for each, and returns the detached activations for the next block. The driver's
transport (``strategies.pipeline.transport``) chains the calls: through the object store,
the next block's call starts as soon as this one's result exists there; in a compiled
graph, Ray's loop on this actor calls ``forward`` for each message on its input channel.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

from orchestrator.data.source import DatasetInfo
from orchestrator.data.stream import Batch, BatchStream
from strategies.optim import set_learning_rate
from strategies.pipeline.local_learning import BlockSpec, build_block
from workers.messages import (
    Activations,
    BatchRange,
    BlockRecord,
    from_wire,
    on_device,
    to_wire,
)
from workers.telemetry import BusyTimeline, StepMemory


class BlockWorker:
    def __init__(
        self,
        spec: BlockSpec,
        data: DatasetInfo,
        batch_size: int,
        threads: int,
        eval_batches: int | None = None,
        wire_on_device: bool = False,
    ) -> None:
        """``wire_on_device``: hand the next block device tensors, not CPU NumPy arrays (a
        compiled graph's NCCL edges carry the tensors GPU to GPU themselves)."""
        torch.set_num_threads(threads)
        self.spec = spec
        self.block = build_block(spec)
        # Dropout draws from the process RNG: seed it per block, checkpoint it with the block.
        torch.manual_seed(spec.seed * 1_000 + spec.plan.index)
        self.first = spec.plan.index == 0
        self.train_stream = (
            BatchStream(data, "train", batch_size, spec.seed) if self.first else None
        )
        self.data, self.batch_size, self.eval_batches = data, batch_size, eval_batches
        self.test_iter: Iterator[Batch] | None = None
        self.timeline = BusyTimeline()
        self.memory = StepMemory(spec.device)
        self.wire = on_device if wire_on_device else to_wire
        # A compiled graph's loop calls forward beside the actor's ordinary calls (follow):
        # a block's weights change under one of them at a time.
        self.lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def _batches(
        self, inbound: BatchRange | Activations
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The call's batches, each with the rule's carry (None where it has none): read
        here by the first block, unpacked from the message after."""
        if isinstance(inbound, Activations):
            pairs: Iterator[Batch] = zip(
                map(from_wire, inbound.hidden), map(from_wire, inbound.labels)
            )
            carries = iter(inbound.carries) if inbound.carries else None
        else:
            read = self.train_stream.batch if inbound.mode == "train" else self._test_batch
            pairs = map(read, range(inbound.first, inbound.first + inbound.count))
            carries = None
        device = self.spec.device
        for x, y in pairs:
            carry = next(carries) if carries is not None else None
            if carry is not None:
                carry = from_wire(carry).to(device, non_blocking=True)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), carry

    def _test_batch(self, index: int) -> Batch:
        """Held-out batches are requested in order 0, 1, ...; stream them, never cache."""
        if index == 0 or self.test_iter is None:
            self.test_iter = iter(BatchStream(self.data, "test", self.batch_size, self.spec.seed))
        return next(self.test_iter)

    def num_test_batches(self) -> int:
        count = sum(1 for _ in BatchStream(self.data, "test", self.batch_size, self.spec.seed))
        return count if self.eval_batches is None else min(count, self.eval_batches)

    def _step(
        self, x: torch.Tensor, y: torch.Tensor, carry: torch.Tensor | None, train: bool
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        with self.lock:
            if not train:
                return self.block.eval_step(x, y, carry)
            with self.memory.backprop():
                hidden, stats = self.block.train_step(x, y)
            self.memory.finish(self.block.parameters(), self.block.optimizer)
            return hidden, stats, None

    def forward(self, inbound: BatchRange | Activations) -> Activations:
        """Train (or evaluate) on every batch the message carries and pass them on.

        ``inbound``: which batches to read (the first block) or the previous block's output.
        """
        train = inbound.mode == "train"
        chains = inbound.records if isinstance(inbound, Activations) else None
        out = Activations(inbound.mode)
        last = self.spec.plan.is_last
        for i, (x, y, carry) in enumerate(self._batches(inbound)):
            with self.timeline.busy():
                hidden, stats, carry = self._step(x, y, carry, train)
            start, end = self.timeline.last()
            record = BlockRecord(
                self.spec.plan.index,
                stats.loss,
                stats.correct,
                stats.count,
                start,
                end,
                stats.applied,
                stats.skipped,
            )
            out.records.append([*chains[i], record] if chains is not None else [record])
            if not last:
                out.hidden.append(self.wire(hidden))
                out.labels.append(self.wire(y))
                if carry is not None:
                    out.carries.append(self.wire(carry))
        return out

    def first_unit(self) -> dict[str, torch.Tensor]:
        """This block's first unit, for the block before it to follow (MAN)."""
        with self.lock:
            return self.block.first_unit()

    def follow(self, first_unit: dict[str, torch.Tensor], momentum: float) -> None:
        """Move this block's MAN moving average towards the next block's first unit."""
        with self.lock:
            self.block.follow(first_unit, momentum)

    def state(self) -> dict:
        return {**self.block.state(), "rng": torch.get_rng_state()}

    def restore(self, state: dict) -> None:
        self.block.restore(state)
        torch.set_rng_state(state["rng"])

    def set_lr(self, lr: float) -> None:
        self.spec = dataclasses.replace(self.spec, lr=lr)
        set_learning_rate(self.block.optimizer, lr)

    def export(self) -> dict:
        """Body and head weights on the CPU, for assembling the whole network."""
        return {
            "body": {k: v.cpu() for k, v in self.block.body.state_dict().items()},
            "head": {k: v.cpu() for k, v in self.block.head.state_dict().items()},
        }

    def peak_training_bytes(self) -> int | None:
        return self.memory.peak
