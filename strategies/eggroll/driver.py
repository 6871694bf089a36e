"""EGGROLL on Ray: population workers evaluate shards, only seeds and fitness travel.

One step is one generation: each worker evaluates its contiguous shard of members
(their noise regenerated from (seed, generation, member)), the controller gathers the
fitness scalars and hands the whole vector back, and every worker, and the controller's
reference replica, applies the identical update. The reference replica is what gets
checkpointed and what a drifted or rebuilt worker is resynced from; every
``checksum_every`` generations the workers' parameter checksums are compared with it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from orchestrator.nonfinite import skipped_figures
from strategies.base import Metrics, Strategy, check_hyperparameters
from strategies.eggroll.config import PRIMARY, EggrollConfig
from strategies.eggroll.lowrank import enough_members, finite_members, scheduled
from strategies.replicas import payload_bytes, shards
from workers.population import ESReplica, PopulationWorker

if TYPE_CHECKING:
    from orchestrator.context import RunContext


class EggrollStrategy(Strategy[EggrollConfig]):
    Config = EggrollConfig

    def __init__(self, config: EggrollConfig) -> None:
        super().__init__(config)
        self.generation = 0
        self.sigma_scale = 1.0
        self.lr_scale = 1.0
        self.best: tuple[float, dict[str, torch.Tensor]] | None = None

    def _replica_args(self, ctx: RunContext) -> dict[str, Any]:
        run = ctx.config
        return {
            "task": self.config.task,
            "model": run.model,
            "dataset": ctx.dataset,
            "optimizer": self.config.optimizer,
            "spec": self.config.noise_spec(),
            "shaping": self.config.shaping,
            "seed": ctx.seed,
        }

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        args = self._replica_args(ctx)
        self.reference = ESReplica(**args)
        self.workers = [
            ctx.spawn(
                PopulationWorker,
                threads=ctx.threads,
                device=ctx.device,
                role="population",
                index=i,
                **args,
            )
            for i in range(ctx.bundle_count)
        ]
        ray.get([w.pid.remote() for w in self.workers])
        self.pending_updates: list[ray.ObjectRef] = []

    # -- schedules ------------------------------------------------------------------
    def _rates(self) -> tuple[float, float]:
        cfg, total = self.config, self.ctx.config.stop.max_steps
        sigma = scheduled(
            cfg.sigma, cfg.sigma_final or cfg.sigma, cfg.sigma_schedule, self.generation, total
        )
        lr0 = cfg.optimizer.lr
        lr = scheduled(lr0, cfg.lr_final or lr0, cfg.lr_schedule, self.generation, total)
        return sigma * self.sigma_scale, lr * self.lr_scale

    # -- one generation -------------------------------------------------------------
    def step(self) -> Metrics:
        g, (sigma, lr) = self.generation, self._rates()
        start = time.perf_counter()
        # Last generation's updates ran before these calls on every worker (actor order);
        # collecting them surfaces an update that raised instead of losing it.
        ray.get(self.pending_updates)
        ranges = shards(self.config.population, len(self.workers))
        asks = [(g, a, b, sigma) for a, b in ranges]
        refs = [w.fitness.remote(*ask) for w, ask in zip(self.workers, asks)]
        parts = ray.get(refs)
        evaluated = time.perf_counter()
        fitness = np.concatenate(parts)
        self.pending_updates = [w.update.remote(g, fitness, sigma, lr) for w in self.workers]
        update_norm = self.reference.update(g, fitness, sigma, lr)
        self.generation += 1
        kept = finite_members(torch.from_numpy(fitness), self.config.antithetic)
        skipping = self.ctx.config.run.nonfinite == "skip"
        # Under skip the figures are the kept members' while enough are left; past that,
        # and under any other policy, the whole population's (NaN), and the run stops.
        shown = fitness[kept.numpy()] if skipping and enough_members(kept) else fitness
        sent = payload_bytes(*asks) + payload_bytes((g, fitness, sigma, lr)) * len(self.workers)
        received = payload_bytes(*parts)
        metrics: Metrics = {
            "train/fitness_mean": float(shown.mean()),
            "train/fitness_max": float(shown.max()),
            "train/fitness_min": float(shown.min()),
            "train/update_norm": update_norm,
            "train/sigma": sigma,
            "train/lr": lr,
            "train/members_per_s": self.config.population / (evaluated - start),
            "system/bytes_per_generation": float(sent + received),
        }
        if skipping:
            metrics.update(skipped_figures(int((~kept).sum()), "member"))
        if self.generation % self.config.checksum_every == 0:
            metrics["system/resynced_workers"] = float(self._resync_drifted())
        return metrics

    def _resync_drifted(self) -> int:
        """Compare every replica with the reference; reload the ones that differ."""
        expected = self.reference.checksum()
        sums = ray.get([w.checksum.remote() for w in self.workers])
        drifted = [w for w, s in zip(self.workers, sums) if s != expected]
        if drifted:
            state = self.reference.state()
            ray.get([w.load.remote(state) for w in drifted])
        return len(drifted)

    def evaluate(self) -> Metrics:
        """Scored on the reference replica's twin, worker 0, once it is known to match
        (the step before an evaluation has just checked when it fell on a check)."""
        if self.generation % self.config.checksum_every != 0:
            self._resync_drifted()
        metrics = ray.get(self.workers[0].evaluate.remote())
        key, mode = PRIMARY[self.config.task.kind]
        score = metrics[key] if mode == "max" else -metrics[key]
        if self.best is None or score > self.best[0]:
            params = {k: v.detach().clone() for k, v in self.reference.model.state_dict().items()}
            self.best = (score, params)
        return metrics

    def headline_metrics(self) -> tuple[str, ...]:
        """The population's mean fitness from the first generation, and the task's held-out
        figure (return, accuracy or bits per character) once evaluated."""
        return ("train/fitness_mean", PRIMARY[self.config.task.kind][0])

    # -- state ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        progress = {
            "generation": self.generation,
            "sigma_scale": self.sigma_scale,
            "lr_scale": self.lr_scale,
        }
        best = {} if self.best is None else {"score": self.best[0], "model": self.best[1]}
        return {"reference": self.reference.state(), "progress": progress, "best": best}

    def restore(self, state: dict[str, Any]) -> None:
        self.reference.load(state["reference"])
        ray.get([w.load.remote(state["reference"]) for w in self.workers])
        progress = state["progress"]
        self.generation = int(progress["generation"])
        self.sigma_scale = float(progress["sigma_scale"])
        self.lr_scale = float(progress["lr_scale"])
        best = state.get("best") or {}
        self.best = (float(best["score"]), best["model"]) if best else None

    def hyperparameters(self) -> dict[str, float]:
        sigma, lr = self._rates()
        return {"sigma": sigma, "lr": lr}

    def set_hyperparameters(self, values: dict[str, float]) -> None:
        check_hyperparameters(values, self.hyperparameters())
        sigma, lr = self._rates()
        if "sigma" in values:
            self.sigma_scale *= values["sigma"] / sigma
        if "lr" in values:
            self.lr_scale *= values["lr"] / lr

    def export_model(self) -> torch.nn.Module:
        """The best centre seen by evaluation (the current one if none was evaluated)."""
        model = self.reference.model
        if self.best is not None:
            exported = ESReplica(**self._replica_args(self.ctx)).model
            exported.load_state_dict(self.best[1])
            return exported
        return model

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        spans = ray.get([w.spans.remote() for w in self.workers])
        return {f"population-{i}": s for i, s in enumerate(spans)}

    def peak_training_bytes(self) -> dict[str, int]:
        values = ray.get([w.peak_training_bytes.remote() for w in self.workers])
        return {f"population-{i}": v for i, v in enumerate(values) if v is not None}
