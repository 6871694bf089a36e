"""DenoiserWorker: one NoProp-DT block on one Ray actor.

A thin shell around ``strategies.noprop.denoiser.DenoisingBlock``. In training it reads its
own batches (its own order: the stream's seed is offset by t) and never hears from another
block. In evaluation the driver chains the workers: each reads the same held-out batches
itself and receives only z_{t-1} from the block before it, through the object store.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from orchestrator.data.source import DatasetInfo
from orchestrator.data.stream import Batch, BatchStream
from orchestrator.nonfinite import mean_of_applied
from strategies.noprop.denoiser import DenoiserSpec, DenoisingBlock
from strategies.optim import set_learning_rate
from workers.telemetry import BusyTimeline, StepMemory


def stream_seed(seed: int, t: int) -> int:
    """Block t's data order: its own, so the blocks do not all see one batch at once."""
    return seed * 1_000 + t


class DenoiserWorker:
    def __init__(
        self,
        spec: DenoiserSpec,
        data: DatasetInfo,
        batch_size: int,
        threads: int,
        eval_batches: int | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.spec = spec
        self.block = DenoisingBlock(spec)
        # q's samples and dropout draw from the process RNG: seeded per block, checkpointed.
        torch.manual_seed(stream_seed(spec.seed, spec.t))
        self.train_stream = BatchStream(data, "train", batch_size, stream_seed(spec.seed, spec.t))
        self.data, self.batch_size, self.eval_batches = data, batch_size, eval_batches
        self.test_iter: Iterator[Batch] | None = None
        self.timeline = BusyTimeline()
        self.memory = StepMemory(spec.device)

    def pid(self) -> int:
        return os.getpid()

    def train(self, first_batch: int, batches: int) -> dict[str, float]:
        """Train on batches ``first_batch ..`` of this block's stream; their figures."""
        denoise, mse, head, applied, busy = [], [], [], [], 0.0
        correct, count = [], 0
        skipped_before = self.block.engine.skipped
        for i in range(first_batch, first_batch + batches):
            x, y = (v.to(self.spec.device) for v in self.train_stream.batch(i))
            with self.timeline.busy():
                with self.memory.backprop():
                    stats = self.block.train_step(x, y)
                self.memory.finish(self.block.parameters(), self.block.optimizer)
            start, end = self.timeline.last()
            busy += end - start
            applied.append(self.block.engine.applied)
            denoise.append(stats.denoise)
            mse.append(stats.mse)
            head.append(stats.head)
            correct.append(stats.correct)
            count += len(y)
        return {
            "denoise": mean_of_applied(torch.stack(denoise).tolist(), applied),
            "mse": mean_of_applied(torch.stack(mse).tolist(), applied),
            "head": mean_of_applied(torch.stack(head).tolist(), applied),
            "correct": int(torch.stack(correct).sum()),
            "count": count,
            "busy_s": busy,
            "skipped": self.block.engine.skipped - skipped_before,
        }

    def num_test_batches(self) -> int:
        count = sum(1 for _ in BatchStream(self.data, "test", self.batch_size, self.spec.seed))
        return count if self.eval_batches is None else min(count, self.eval_batches)

    def _test_batch(self, index: int) -> Batch:
        """Held-out batches are requested in order 0, 1, ...; stream them, never cache."""
        if index == 0 or self.test_iter is None:
            self.test_iter = iter(BatchStream(self.data, "test", self.batch_size, self.spec.seed))
        return next(self.test_iter)

    def _generator(self, index: int) -> torch.Generator:
        """The inference noise of block t on held-out batch ``index``: the same every eval,
        and its own (a seed mixed from all three, not a sum that two blocks could share)."""
        mixed = np.random.SeedSequence([self.spec.seed, self.spec.t, index]).generate_state(1)
        return torch.Generator().manual_seed(int(mixed[0]))

    def _steps(
        self, first: int, count: int, z_prev: list[torch.Tensor] | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(y, z_t) of held-out batches ``first ..``, from the previous block's z_{t-1}
        (block 1 gets None and draws z_0 ~ N(0, I) here)."""
        device, dim = self.spec.device, self.block.net.embedding.shape[1]
        for offset, index in enumerate(range(first, first + count)):
            x, y = self._test_batch(index)
            generator = self._generator(index)
            z = torch.randn(len(x), dim, generator=generator) if z_prev is None else z_prev[offset]
            yield y, self.block.denoise(x.to(device), z.to(device), generator).cpu()

    def infer(
        self, first: int, count: int, z_prev: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        """z_t of held-out batches ``first ..`` for the next block."""
        return [z for _, z in self._steps(first, count, z_prev)]

    def infer_and_score(
        self, first: int, count: int, z_prev: list[torch.Tensor] | None
    ) -> dict[str, float]:
        """Block T: z_T as ``infer``, then p̂(y | z_T); summed loss, hits and examples."""
        loss, correct, scored = 0.0, 0, 0
        for y, z in self._steps(first, count, z_prev):
            logits = self.block.classify(z.to(self.spec.device)).cpu()
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            scored += len(y)
        return {"loss": loss, "correct": correct, "count": scored}

    def state(self) -> dict:
        return {**self.block.state(), "rng": torch.get_rng_state()}

    def restore(self, state: dict) -> None:
        self.block.restore(state)
        torch.set_rng_state(state["rng"])

    def set_lr(self, lr: float) -> None:
        set_learning_rate(self.block.optimizer, lr)

    def embedding(self) -> torch.Tensor:
        return self.block.net.embedding.detach().cpu().clone()

    def set_embedding(self, embedding: torch.Tensor) -> None:
        self.block.set_embedding(embedding)

    def spans(self) -> list[tuple[float, float]]:
        return list(self.timeline.spans)

    def peak_training_bytes(self) -> int | None:
        return self.memory.peak
