"""PI-HC-MoE on Ray: one basis worker, one expert actor per subdomain.

One step is ``batches_per_step`` training batches. For each, the driver submits the chain

    tasks  = basis.prepare(t)                 (num_returns = K: one task per expert)
    ω*_k   = expert_k.solve(tasks[k])         (the K solves run in parallel)
    dL/dω* = basis.combine(ω*_1 .. ω*_K)      (num_returns = K + 1: metrics, one per expert)
    dL/dΦ  = expert_k.vjp(dL/dω*_k)           (K local adjoint solves, in parallel)
    basis.apply(dL/dΦ_1 .. dL/dΦ_K)

and moves on: every tensor goes actor to actor through the object store, none through
the driver, which only gathers the metrics. Experts hold no state between steps, so a
lost one is rebuilt by the controller from the basis worker's checkpoint like any worker.
``constraint: soft`` is the soft-constraint PINN baseline (no experts);
``experts: {}`` is the single global hard constraint.

With ``problem.online``, ``online.generators`` solver actors (``PDEGeneratorWorker``) make
new instances while training runs, into the run's buffer on storage; the basis worker
draws every batch from it. The buffer's bookkeeping is part of the basis worker's
checkpoint, and its shards stay on storage, so a lost generator is recovered like any
worker: its error surfaces in the basis worker's ``prepare``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import ray
import torch

from strategies.base import Metrics, Strategy, check_hyperparameters
from strategies.moe_hc.config import MoEHCConfig
from strategies.moe_hc.mixture import BasisNetwork, Decomposition
from strategies.moe_hc.pde.problems import build_problem, online_directory
from strategies.moe_hc.training import Sampling
from workers.basis import BasisWorker
from workers.expert import ExpertWorker
from workers.pde_generator import PDEGeneratorWorker

if TYPE_CHECKING:
    from orchestrator.context import RunContext


def decomposition(config: MoEHCConfig) -> Decomposition:
    """The experts' boxes: the problem's domain cut as ``experts`` says (one box when soft)."""
    coordinates = build_problem(config.problem).coordinates
    splits = tuple(config.experts.get(c.name, 1) for c in coordinates)
    if config.constraint == "soft":
        splits = tuple(1 for _ in coordinates)
    return Decomposition(
        tuple(c.lo for c in coordinates), tuple(c.hi for c in coordinates), splits, config.overlap
    )


class MoEHCStrategy(Strategy[MoEHCConfig]):
    Config = MoEHCConfig

    def __init__(self, config: MoEHCConfig) -> None:
        super().__init__(config)
        self.next_batch = 0
        self.lr = config.optimizer.lr

    def _network_args(self) -> dict[str, int]:
        basis, problem = self.config.basis, build_problem(self.config.problem)
        return {
            "num_basis": basis.functions * problem.groups,
            "width": basis.width,
            "depth": basis.depth,
            "harmonics": basis.harmonics,
        }

    def _trainer_args(self, ctx: RunContext) -> dict[str, Any]:
        cfg = self.config
        return {
            "problem": cfg.problem,
            "network": self._network_args(),
            "optimizer": cfg.optimizer,
            "decomposition": decomposition(cfg),
            "sampling": Sampling(
                cfg.instances_per_batch,
                cfg.constraint_points,
                cfg.boundary_points,
                cfg.data_points,
                cfg.residual_points,
            ),
            "constraint": cfg.constraint,
            "continuity_weight": cfg.continuity_weight,
            "soft_weight": cfg.soft_weight,
            "seed": ctx.seed,
            "device": ctx.device,
            "outer_loss": cfg.outer_loss,
            "residual_weight": cfg.residual_weight,
            "engine": ctx.config.engine,
        }

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        k = self.config.expert_count
        options = self.config.solver.options()
        self.experts = [
            ctx.spawn(
                ExpertWorker,
                self.config.problem,
                options,
                ctx.threads,
                ctx.device,
                role="expert",
                index=i,
            )
            for i in range(k)
        ]
        self.generators: list[Any] = []
        online_args: dict[str, Any] = {}
        if self.config.problem.online is not None:
            directory = self._online_directory(ctx)
            self.generators = self._spawn_generators(ctx, directory)
            online_args = {"generators": self.generators, "online_directory": directory}
        self.basis = ctx.spawn(
            BasisWorker,
            threads=ctx.threads,
            role="basis",
            index=0,
            bundle=k,
            **self._trainer_args(ctx),
            **online_args,
        )
        ray.get([w.pid.remote() for w in self._workers().values()])
        ray.get(self.basis.set_lr.remote(self.lr))

    def _online_directory(self, ctx: RunContext) -> str:
        """The run's buffer, named by the run (a PBT slot's by its slot, the same in every
        generation), so a recovered or resumed run finds the shards its checkpoint lists."""
        slot = ctx.name_prefix.split("/")[0]
        owner = "/".join(filter(None, [ctx.config.run_name, slot]))
        return online_directory(self.config.problem, owner)

    def _spawn_generators(self, ctx: RunContext, directory: str) -> list[Any]:
        """The online run's solver actors, on the bundles after the basis worker's."""
        online = self.config.problem.online
        assert online is not None
        first = self.config.expert_count + 1
        return [
            ctx.spawn(
                PDEGeneratorWorker,
                self.config.problem,
                directory,
                i,
                ctx.threads,
                role="generator",
                index=i,
                bundle=first + i,
                num_gpus=0,  # the reference solvers are NumPy/SciPy
            )
            for i in range(online.generators)
        ]

    def _solve_tasks(self, prepare: Any, *args: Any) -> list[ray.ObjectRef]:
        """Each expert solves its own task of a basis-worker method that makes one per expert."""
        k = len(self.experts)
        tasks = prepare.options(num_returns=k).remote(*args)
        tasks = [tasks] if k == 1 else tasks  # Ray hands one ref, not a list, when k is 1
        return [e.solve.remote(task) for e, task in zip(self.experts, tasks)]

    def _submit_batch(self, t: int) -> list[ray.ObjectRef]:
        """The chain of one batch; returns the refs that carry its metrics."""
        basis, experts, k = self.basis, self.experts, len(self.experts)
        if not experts:
            return [basis.soft_step.remote(t)]
        solutions = self._solve_tasks(basis.prepare, t)
        metrics, *cotangents = basis.combine.options(num_returns=k + 1).remote(*solutions)
        grads = [e.vjp.remote(c) for e, c in zip(experts, cotangents)]
        return [metrics, basis.apply.remote(*grads)]

    def step(self) -> Metrics:
        n = self.config.batches_per_step
        start = time.perf_counter()
        chains = [self._submit_batch(self.next_batch + b) for b in range(n)]
        flat = ray.get([ref for chain in chains for ref in chain])
        width = len(chains[0])
        results = [flat[i : i + width] for i in range(0, len(flat), width)]
        wall = time.perf_counter() - start
        self.next_batch += n
        sums: dict[str, float] = defaultdict(float)
        for outcome in results:
            for key, value in outcome[0].items():
                sums[key] += value
            if len(outcome) > 1:
                sums["train/grad_norm"] += outcome[1]
        metrics = {key: value / n for key, value in sums.items()}
        metrics["train/step_s"] = wall / n
        if self.generators:  # the buffer's figures over the whole step, not per batch
            metrics.update(ray.get(self.basis.online_stats.remote()))
        return metrics

    def evaluate(self) -> Metrics:
        """Every held-out instance, solved by the experts on fixed constraint points."""
        start = time.perf_counter()
        if self.experts:
            solutions = self._solve_tasks(self.basis.evaluation_tasks)
            metrics = ray.get(self.basis.evaluate.remote(*solutions))
        else:
            metrics = ray.get(self.basis.evaluate.remote())
        seconds = time.perf_counter() - start
        metrics["eval/inference_s"] = seconds / self.config.problem.test_instances
        return metrics

    def headline_metrics(self) -> tuple[str, ...]:
        return ("train/loss", "eval/rel_l2", "eval/pde_residual")

    def state(self) -> dict[str, Any]:
        return {
            "basis": ray.get(self.basis.state.remote()),
            "progress": {"next_batch": self.next_batch, "lr": self.lr},
        }

    def restore(self, state: dict[str, Any]) -> None:
        ray.get(self.basis.load.remote(state["basis"]))
        self.next_batch = int(state["progress"]["next_batch"])
        self.set_hyperparameters({"lr": float(state["progress"]["lr"])})

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}

    def set_hyperparameters(self, values: dict[str, float]) -> None:
        check_hyperparameters(values, self.hyperparameters())
        self.lr = float(values.get("lr", self.lr))
        ray.get(self.basis.set_lr.remote(self.lr))

    def export_model(self) -> torch.nn.Module:
        problem = build_problem(self.config.problem)
        network = BasisNetwork(problem.coordinates, problem.num_features, **self._network_args())
        network.load_state_dict(ray.get(self.basis.export.remote()))
        return network

    def _workers(self) -> dict[str, Any]:
        return (
            {"basis-0": self.basis}
            | {f"expert-{i}": e for i, e in enumerate(self.experts)}
            | {f"generator-{i}": g for i, g in enumerate(self.generators)}
        )

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        workers = self._workers()
        spans = ray.get([w.spans.remote() for w in workers.values()])
        return dict(zip(workers, spans))

    def peak_training_bytes(self) -> dict[str, int]:
        workers = self._workers()
        values = ray.get([w.peak_training_bytes.remote() for w in workers.values()])
        return {name: v for name, v in zip(workers, values) if v is not None}

    def artifacts(self) -> dict[str, Any]:
        """Reference, prediction and error of the first held-out instance; online, the ids
        of the instances every batch trained on."""
        from orchestrator import plots

        records: dict[str, Any] = {}
        if self.generators:
            records["moe_hc/seen_instances.csv"] = ray.get(self.basis.seen_instances.remote())
        sample = ray.get(self.basis.field_sample.remote())
        if "prediction" not in sample:
            return records
        title = f"{self.ctx.config.run_name}: {self.config.problem.kind}, held-out instance 0"
        figure = plots.solution_fields(
            sample["reference"], sample["prediction"], sample["axes"], title
        )
        return records | {"moe_hc/fields.png": figure}
