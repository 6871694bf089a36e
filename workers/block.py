"""BlockWorker: one pipeline block on one Ray actor.

A thin shell around ``strategies.pipeline.local_learning.LocalBlock``: it receives an activation
(or, as the first block, reads its own batch), updates on its local loss, and returns
the detached activation for the next block. Calls are chained by the driver, so the
next block's call starts as soon as this one's result exists in the object store.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import torch

from orchestrator.data.source import DatasetInfo
from orchestrator.data.stream import BatchStream
from strategies.optim import set_learning_rate
from strategies.pipeline.local_learning import BlockSpec, build_block
from workers.messages import Activation, BlockRecord, from_wire, to_wire
from workers.telemetry import BusyTimeline, StepMemory


class BlockWorker:
    def __init__(
        self,
        spec: BlockSpec,
        data: DatasetInfo,
        batch_size: int,
        threads: int,
        eval_batches: int | None = None,
    ) -> None:
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
        self.test_iter: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.timeline = BusyTimeline()
        self.memory = StepMemory(spec.device)

    def pid(self) -> int:
        return os.getpid()

    def _inputs(self, inbound: int | Activation, train: bool) -> tuple[Activation, torch.Tensor]:
        if isinstance(inbound, Activation):
            x, labels = from_wire(inbound.hidden), from_wire(inbound.labels)
        elif train:
            x, labels = self.train_stream.batch(inbound)
            inbound = Activation(None, to_wire(labels))
        else:
            x, labels = self._test_batch(inbound)
            inbound = Activation(None, to_wire(labels))
        device = self.spec.device
        return inbound, (x.to(device, non_blocking=True), labels.to(device, non_blocking=True))

    def _test_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out batches are requested in order 0, 1, ...; stream them, never cache."""
        if index == 0 or self.test_iter is None:
            self.test_iter = iter(BatchStream(self.data, "test", self.batch_size, self.spec.seed))
        return next(self.test_iter)

    def num_test_batches(self) -> int:
        count = sum(1 for _ in BatchStream(self.data, "test", self.batch_size, self.spec.seed))
        return count if self.eval_batches is None else min(count, self.eval_batches)

    def _forward(self, inbound: int | Activation, train: bool) -> Activation:
        message, (x, y) = self._inputs(inbound, train)
        with self.timeline.busy():
            if train:
                with self.memory.backprop():
                    hidden, stats = self.block.train_step(x, y)
                self.memory.finish(self.block.parameters(), self.block.optimizer)
            else:
                hidden, stats = self.block.eval_step(x, y)
        start, end = self.timeline.last()
        record = BlockRecord(
            self.spec.plan.index, stats.loss, stats.correct, stats.count, start, end
        )
        records = [*message.records, record]
        if self.spec.plan.is_last:
            return Activation(None, None, records)
        return Activation(to_wire(hidden), message.labels, records)

    def train(self, inbound: int | Activation) -> Activation:
        """``inbound``: the global batch index (first block) or the previous block's output."""
        return self._forward(inbound, train=True)

    def evaluate(self, inbound: int | Activation) -> Activation:
        return self._forward(inbound, train=False)

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
