"""NoProp-DT on Ray: T denoising blocks, one actor each, trained with no pass between them.

A step asks every block to train ``batches_per_step`` batches of its own stream at once; the
blocks never wait for one another (nothing flows block to block in training). With a learned
embedding, block T trains W_Embed beside the classifier and the driver sends it to the other
blocks every ``embed_sync_every`` steps (C x d floats). Evaluation is the only chain: for a
few held-out batches at a time the driver submits ``z1 = b1.infer(..); z2 = b2.infer(z1); ..``
and block T scores p̂(y | z_T); z travels actor to actor through the object store, and every
block reads x itself.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import ray

from orchestrator.nonfinite import skipped_figures
from strategies.base import Metrics, Strategy, check_hyperparameters
from strategies.noprop.config import NoPropConfig
from strategies.noprop.denoiser import DenoiserSpec
from workers.denoiser import DenoiserWorker

if TYPE_CHECKING:
    from orchestrator.context import RunContext

EVAL_BATCHES_PER_CALL = 4
"""Held-out batches per chain of calls: several chains are in flight at once, so block t
denoises one while block t + 1 denoises the one before."""


def summarize(stats: list[dict[str, float]], wall_s: float) -> Metrics:
    """Per-block and whole-run figures of one step; ``stats[t - 1]`` is block t's.

    ``train/loss`` is Eq. 8: the mean over blocks of their weighted denoising terms (the
    expectation over t ~ U{1..T}) plus block T's CE and KL. ``train/samples_per_s`` counts
    the examples one block trained on: each block sees its own stream, so the network as a
    whole has seen that many, as a backprop baseline's would."""
    metrics: Metrics = {}
    for t, s in enumerate(stats, start=1):
        name = f"block-{t}/train/"
        metrics[f"{name}local_loss"] = s["denoise"] + s["head"]
        metrics[f"{name}denoise_mse"] = s["mse"]
        metrics[f"{name}samples_per_s"] = s["count"] / wall_s
        metrics[f"block-{t}/system/busy_fraction"] = min(1.0, s["busy_s"] / wall_s)
    last = stats[-1]
    metrics["train/loss"] = sum(s["denoise"] for s in stats) / len(stats) + last["head"]
    metrics["train/classifier_loss"] = last["head"]
    metrics["train/classifier_accuracy"] = last["correct"] / last["count"]
    metrics["train/samples_per_s"] = last["count"] / wall_s
    return metrics


class NoPropStrategy(Strategy[NoPropConfig]):
    Config = NoPropConfig

    def __init__(self, config: NoPropConfig) -> None:
        super().__init__(config)
        self.lr = config.optimizer.lr
        self.next_batch = 0
        self.steps = 0

    def setup(self, ctx: RunContext) -> None:
        run = ctx.config
        self.ctx = ctx
        self.workers = [
            ctx.spawn(
                DenoiserWorker,
                DenoiserSpec(
                    t=t,
                    config=self.config,
                    model=run.model,
                    input=ctx.dataset.input,
                    seed=ctx.seed,
                    device=ctx.device,
                    engine=run.engine,
                    skip_nonfinite=run.run.nonfinite == "skip",
                ),
                ctx.dataset,
                run.data.batch_size,
                ctx.threads,
                run.eval.max_batches,
                role="block",
                index=t,
                bundle=t - 1,
            )
            for t in range(1, self.config.blocks + 1)
        ]
        ray.get([w.set_lr.remote(self.lr) for w in self.workers])
        self.num_test_batches: int | None = None

    def step(self) -> Metrics:
        start = time.perf_counter()
        n = self.config.batches_per_step
        stats = ray.get([w.train.remote(self.next_batch, n) for w in self.workers])
        self.next_batch += n
        self.steps += 1
        if self.config.embedding == "learned" and self.steps % self.config.embed_sync_every == 0:
            self._send_embedding()
        metrics = summarize(stats, time.perf_counter() - start)
        if self.ctx.config.run.nonfinite == "skip":
            metrics.update(skipped_figures(sum(int(s["skipped"]) for s in stats), "update"))
        return metrics

    def _send_embedding(self) -> None:
        """Block T's learned W_Embed to every other block (one object, put once)."""
        embedding = self.workers[-1].embedding.remote()
        ray.get([w.set_embedding.remote(embedding) for w in self.workers[:-1]])

    def evaluate(self) -> Metrics:
        if self.num_test_batches is None:
            self.num_test_batches = ray.get(self.workers[0].num_test_batches.remote())
        *chain, last = self.workers
        pending: deque[Any] = deque()
        for first in range(0, self.num_test_batches, EVAL_BATCHES_PER_CALL):
            count = min(EVAL_BATCHES_PER_CALL, self.num_test_batches - first)
            z = None
            for worker in chain:
                z = worker.infer.remote(first, count, z)
            pending.append(last.infer_and_score.remote(first, count, z))
        scores = ray.get(list(pending))
        count = sum(s["count"] for s in scores)
        return {
            "eval/loss": sum(s["loss"] for s in scores) / count,
            "eval/accuracy": sum(s["correct"] for s in scores) / count,
        }

    def state(self) -> dict[str, Any]:
        states = ray.get([w.state.remote() for w in self.workers])
        blocks = {f"block-{t}": s for t, s in enumerate(states, start=1)}
        progress = {"next_batch": self.next_batch, "steps": self.steps, "lr": self.lr}
        return {**blocks, "progress": progress}

    def restore(self, state: dict[str, Any]) -> None:
        ray.get(
            [w.restore.remote(state[f"block-{t}"]) for t, w in enumerate(self.workers, start=1)]
        )
        self.next_batch = int(state["progress"]["next_batch"])
        self.steps = int(state["progress"]["steps"])
        self.set_hyperparameters({"lr": float(state["progress"]["lr"])})

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}

    def set_hyperparameters(self, values: dict[str, float]) -> None:
        check_hyperparameters(values, self.hyperparameters())
        self.lr = float(values.get("lr", self.lr))
        ray.get([w.set_lr.remote(self.lr) for w in self.workers])

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        spans = ray.get([w.spans.remote() for w in self.workers])
        return {f"block-{t}": s for t, s in enumerate(spans, start=1)}

    def peak_training_bytes(self) -> dict[str, int]:
        values = ray.get([w.peak_training_bytes.remote() for w in self.workers])
        return {f"block-{t}": v for t, v in enumerate(values, start=1) if v is not None}
