"""BackpropWorker: the whole network in one actor, trained end to end.

The baseline every benchmark compares against: same layers, same initial weights,
same data order as the pipeline, but one global backward pass per batch.
"""

from __future__ import annotations

import os

import torch

from orchestrator.config import EngineConfig
from orchestrator.data.source import DatasetInfo
from orchestrator.data.stream import BatchStream
from orchestrator.nonfinite import mean_of_applied
from strategies.config import ModelConfig, OptimizerConfig
from strategies.engines.base import build_engine
from strategies.models.loss import task_loss
from strategies.models.network import build_network
from strategies.optim import build_optimizer, set_learning_rate
from workers.host import on_host
from workers.telemetry import BusyTimeline, StepMemory


class BackpropWorker:
    def __init__(
        self,
        model: ModelConfig,
        optimizer: OptimizerConfig,
        data: DatasetInfo,
        batch_size: int,
        seed: int,
        threads: int,
        device: str = "cpu",
        eval_batches: int | None = None,
        engine: EngineConfig | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        torch.set_num_threads(threads)
        self.device = device
        self.network = build_network(model, data.input, seed).to(device)
        torch.manual_seed(seed)  # dropout's masks follow the run seed, and are checkpointed
        self.engine = build_engine(
            engine or EngineConfig(),
            [self.network],
            build_optimizer(self.network.parameters(), optimizer),
            device,
            skip_nonfinite,
        )
        self.optimizer = self.engine.optimizer
        self.train_stream = BatchStream(data, "train", batch_size, seed)
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.eval_batches = eval_batches
        self.timeline = BusyTimeline()
        self.memory = StepMemory(device)

    def pid(self) -> int:
        return os.getpid()

    def _update(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One step on a batch; its loss, correct predictions and predictions made."""
        with self.engine.autocast():
            loss, hits, count = task_loss(self.network(x), y)
        self.engine.update(loss)
        return loss.detach(), hits, count

    def train(self, first_batch: int, batches: int) -> dict[str, float]:
        """Train on batches ``first_batch .. first_batch + batches - 1``; return their stats.

        The stats stay tensors until the call ends, then are read out at once: the same
        figures (summed in the same order) for a few operators per call rather than per
        batch, which a small model notices. The loss is that of the batches whose update
        was applied (``run.nonfinite: skip`` drops the others; ``skipped`` counts them).
        """
        self.network.train()
        losses, hits, count, busy = [], [], 0, 0.0
        applied, skipped_before = [], self.engine.skipped
        for t in range(first_batch, first_batch + batches):
            x, y = (v.to(self.device) for v in self.train_stream.batch(t))
            with self.timeline.busy():
                with self.memory.backprop():
                    loss, batch_hits, batch_count = self._update(x, y)
                self.memory.finish(self.network.parameters(), self.optimizer)
            start, end = self.timeline.last()
            busy += end - start
            losses.append(loss)
            applied.append(self.engine.applied)
            hits.append(batch_hits)
            count += batch_count
        loss = mean_of_applied(torch.stack(losses).tolist(), applied)
        correct = int(torch.stack(hits).sum())
        skipped = self.engine.skipped - skipped_before
        return {
            "loss": loss,
            "correct": correct,
            "count": count,
            "busy_s": busy,
            "skipped": skipped,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.network.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for i, (x, y) in enumerate(BatchStream(self.data, "test", self.batch_size, self.seed)):
            if self.eval_batches is not None and i >= self.eval_batches:
                break
            x, y = x.to(self.device), y.to(self.device)
            with self.engine.autocast():
                loss, hits, scored = task_loss(self.network(x), y, reduction="sum")
            loss_sum += float(loss)
            correct += int(hits)
            count += scored
        return {"loss": loss_sum / count, "accuracy": correct / count}

    def state(self) -> dict:
        return on_host(
            {
                "network": self.network.state_dict(),
                "optimizer": self.engine.state(),
                "rng": torch.get_rng_state(),
            }
        )

    def restore(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.engine.load(state["optimizer"])
        torch.set_rng_state(state["rng"])

    def set_lr(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)

    def export(self) -> dict:
        return {k: v.cpu() for k, v in self.network.state_dict().items()}

    def spans(self) -> list[tuple[float, float]]:
        return list(self.timeline.spans)

    def peak_training_bytes(self) -> int | None:
        return self.memory.peak
