"""End-to-end backpropagation in one worker: the baseline for every comparison."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import ray
import torch

from orchestrator.nonfinite import skipped_figures
from strategies.backprop.config import BackpropConfig
from strategies.base import Metrics, Strategy, check_hyperparameters
from strategies.models.loss import with_bits
from strategies.models.network import build_network
from workers.trainer import BackpropWorker

if TYPE_CHECKING:
    from orchestrator.context import RunContext


class BackpropStrategy(Strategy[BackpropConfig]):
    Config = BackpropConfig

    def __init__(self, config: BackpropConfig) -> None:
        super().__init__(config)
        self.lr = config.optimizer.lr
        self.next_batch = 0

    def setup(self, ctx: RunContext) -> None:
        run = ctx.config
        self.ctx = ctx
        self.worker = ctx.spawn(
            BackpropWorker,
            run.model,
            self.config.optimizer,
            ctx.dataset,
            run.data.batch_size,
            ctx.seed,
            ctx.threads,
            ctx.device,
            run.eval.max_batches,
            run.engine,
            run.run.nonfinite == "skip",
            role="trainer",
            index=0,
        )
        ray.get(self.worker.set_lr.remote(self.lr))

    def step(self) -> Metrics:
        start = time.perf_counter()
        n = self.config.batches_per_step
        stats = ray.get(self.worker.train.remote(self.next_batch, n))
        self.next_batch += n
        wall = time.perf_counter() - start
        metrics = {
            "train/loss": stats["loss"],
            "train/accuracy": stats["correct"] / stats["count"],
            "train/samples_per_s": stats["count"] / wall,
            "trainer-0/system/busy_fraction": min(1.0, stats["busy_s"] / wall),
        }
        if self.ctx.config.run.nonfinite == "skip":
            metrics.update(skipped_figures(stats["skipped"], "update"))
        return metrics

    def evaluate(self) -> Metrics:
        stats = ray.get(self.worker.evaluate.remote())
        metrics = {"eval/loss": stats["loss"], "eval/accuracy": stats["accuracy"]}
        return with_bits(metrics, self.ctx.dataset.input, "eval")

    def state(self) -> dict[str, Any]:
        return {
            "trainer-0": ray.get(self.worker.state.remote()),
            "progress": {"next_batch": self.next_batch, "lr": self.lr},
        }

    def restore(self, state: dict[str, Any]) -> None:
        ray.get(self.worker.restore.remote(state["trainer-0"]))
        self.next_batch = int(state["progress"]["next_batch"])
        self.set_hyperparameters({"lr": float(state["progress"]["lr"])})

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}

    def set_hyperparameters(self, values: dict[str, float]) -> None:
        check_hyperparameters(values, self.hyperparameters())
        self.lr = float(values.get("lr", self.lr))
        ray.get(self.worker.set_lr.remote(self.lr))

    def export_model(self) -> torch.nn.Module:
        info = self.ctx.dataset
        network = build_network(self.ctx.config.model, info.input, 0)
        network.load_state_dict(ray.get(self.worker.export.remote()))
        return network

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        return {"trainer-0": ray.get(self.worker.spans.remote())}

    def peak_training_bytes(self) -> dict[str, int]:
        value = ray.get(self.worker.peak_training_bytes.remote())
        return {} if value is None else {"trainer-0": value}
