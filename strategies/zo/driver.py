"""MeZO / SPSA on Ray: data-parallel workers score slices of one batch, only scalars travel.

One SPSA update t: every worker scores its contiguous slice of train batch t at
theta +- eps z_k for the update's n directions (regenerated from (seed, t, k), never sent)
and returns the summed losses; the controller adds the slices up, turns each pair into a
projected gradient g_k and hands the g_k back; every worker, and the controller's reference
replica, applies the identical step (EGGROLL's seed-only communication: the batch's rows
and the weights never move). A step is ``batches_per_step`` updates. The reference replica
is what gets checkpointed and what a drifted or rebuilt worker is resynced from; every
``checksum_every`` steps the workers' parameter checksums are compared with it.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from orchestrator.nonfinite import skipped_figures
from strategies.base import Metrics, Strategy, check_hyperparameters
from strategies.replicas import payload_bytes, shards
from strategies.zo.config import ZOConfig
from strategies.zo.spsa import projected_gradients
from workers.zo import ZOReplica, ZOWorker

if TYPE_CHECKING:
    from orchestrator.context import RunContext


class ZOStrategy(Strategy[ZOConfig]):
    Config = ZOConfig

    def __init__(self, config: ZOConfig) -> None:
        super().__init__(config)
        self.lr, self.eps = config.lr, config.eps
        self.next_update = 0
        self.steps = 0

    def _replica_args(self, ctx: RunContext) -> dict[str, Any]:
        run, cfg = ctx.config, self.config
        return {
            "model": run.model,
            "dataset": ctx.dataset,
            "batch_size": run.data.batch_size,
            "seed": ctx.seed,
            "directions": cfg.directions,
            "weight_decay": cfg.weight_decay,
            "in_place": cfg.in_place,
            "eval_batches": run.eval.max_batches,
        }

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        args = self._replica_args(ctx)
        self.reference = ZOReplica(**args)
        self.workers = [
            ctx.spawn(
                ZOWorker,
                threads=ctx.threads,
                device=ctx.device,
                role="replica",
                index=i,
                **args,
            )
            for i in range(ctx.bundle_count)
        ]
        ray.get([w.pid.remote() for w in self.workers])
        self.pending_updates: list[ray.ObjectRef] = []

    # -- one step: batches_per_step SPSA updates ---------------------------------------
    def step(self) -> Metrics:
        start = time.perf_counter()
        losses, grads, norms, sent, received, skipped = [], [], [], 0, 0, 0
        for _ in range(self.config.batches_per_step):
            t = self.next_update
            ranges = shards(self.ctx.config.data.batch_size, len(self.workers))
            asks = [(t, a, b, self.eps) for a, b in ranges]
            refs = [w.losses.remote(*ask) for w, ask in zip(self.workers, asks)]
            # Last update ran before these calls on every worker (actor order); collecting
            # it surfaces an update that raised instead of losing it.
            ray.get(self.pending_updates)
            parts = ray.get(refs)
            count = sum(part[1] for part in parts)
            mean = np.sum([part[0] for part in parts], axis=0) / count  # [directions, 2]
            kept = projected_gradients(mean[:, 0], mean[:, 1], self.eps)
            self.pending_updates = [w.update.remote(t, kept, self.lr) for w in self.workers]
            if self.config.in_place:
                self.reference.drift(t, self.eps)
            norms.append(self.reference.update(t, kept, self.lr))
            self.next_update += 1
            skipped += self.config.directions - len(kept)
            losses.append(mean[sorted(kept)] if self._skipping() else mean)
            grads.extend(kept.values())
            sent += payload_bytes(*asks) + payload_bytes((t, kept, self.lr)) * len(self.workers)
            received += payload_bytes(*parts)
        wall = time.perf_counter() - start
        self.steps += 1
        scored = np.concatenate(losses)
        metrics: Metrics = {
            # (L+ + L-)/2 is L(theta) up to O(eps^2): the loss at the weights being trained.
            "train/loss": float(scored.mean()) if scored.size else math.nan,
            "train/projected_gradient_rms": float(np.sqrt(np.mean(np.square(grads))))
            if grads
            else math.nan,
            "train/update_norm": float(np.mean(norms)),
            "train/lr": self.lr,
            "train/eps": self.eps,
            "train/samples_per_s": self.ctx.config.data.batch_size
            * self.config.batches_per_step
            / wall,
            "system/bytes_per_step": float(sent + received),
        }
        if self._skipping():
            metrics.update(skipped_figures(skipped, "direction"))
        if self.steps % self.config.checksum_every == 0:
            metrics["system/resynced_workers"] = float(self._resync_drifted())
        return metrics

    def _skipping(self) -> bool:
        return self.ctx.config.run.nonfinite == "skip"

    def _resync_drifted(self) -> int:
        """Compare every replica with the reference; reload the ones that differ."""
        ray.get(self.pending_updates)
        expected = self.reference.checksum()
        sums = ray.get([w.checksum.remote() for w in self.workers])
        drifted = [w for w, s in zip(self.workers, sums) if s != expected]
        if drifted:
            state = self.reference.state()
            ray.get([w.load.remote(state) for w in drifted])
        return len(drifted)

    def evaluate(self) -> Metrics:
        """Scored on worker 0 once it is known to match the reference (the step before an
        evaluation has just checked when it fell on a check)."""
        if self.steps % self.config.checksum_every != 0:
            self._resync_drifted()
        return ray.get(self.workers[0].evaluate.remote())

    # -- state ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        progress = {
            "next_update": self.next_update,
            "steps": self.steps,
            "lr": self.lr,
            "eps": self.eps,
        }
        return {"reference": self.reference.state(), "progress": progress}

    def restore(self, state: dict[str, Any]) -> None:
        ray.get(self.pending_updates)
        self.reference.load(state["reference"])
        ray.get([w.load.remote(state["reference"]) for w in self.workers])
        progress = state["progress"]
        self.next_update = int(progress["next_update"])
        self.steps = int(progress["steps"])
        self.lr, self.eps = float(progress["lr"]), float(progress["eps"])

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "eps": self.eps}

    def set_hyperparameters(self, values: dict[str, float]) -> None:
        check_hyperparameters(values, self.hyperparameters())
        self.lr = float(values.get("lr", self.lr))
        self.eps = float(values.get("eps", self.eps))

    def export_model(self) -> torch.nn.Module:
        return self.reference.model

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        spans = ray.get([w.spans.remote() for w in self.workers])
        return {f"replica-{i}": s for i, s in enumerate(spans)}

    def peak_training_bytes(self) -> dict[str, int]:
        values = ray.get([w.peak_training_bytes.remote() for w in self.workers])
        return {f"replica-{i}": v for i, v in enumerate(values) if v is not None}
