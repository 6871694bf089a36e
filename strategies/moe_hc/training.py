"""One training step of PI-HC-MoE, cut where the work changes hands (no Ray here).

    basis:   prepare(t)   network forward at every expert's constraint points -> K tasks
    expert:  solve(task)  ω*_k by Levenberg–Marquardt on its own subdomain
    basis:   combine(ω*)  the stitched (blended) solution's outer loss -> dL/dω*_k
    expert:  vjp(dL/dω*)  dL/dΦ_k by the implicit function theorem (one adjoint solve)
    basis:   apply(dL/dΦ) backpropagate into the network, optimizer step

The experts never see the network and the network never sees a solve: only basis
evaluations and their cotangents travel. The outer loss (``OuterLoss``) is the paper's,
the PDE, initial and boundary residuals of the stitched solution at fresh points
(``stitched_residual``), or the data loss against the reference solver, or both.
``local_step`` runs the same five phases in one process (the tests, the global
single-solve baseline). ``soft_step`` is the soft-constraint PINN baseline on the same
network: u = Φ ω with ω a learned head, the residual a penalty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import vmap

from orchestrator.config import EngineConfig
from strategies.config import OptimizerConfig
from strategies.engines.base import build_engine
from strategies.moe_hc.hard_constraint import SolverOptions, implicit_vjp, levenberg_marquardt
from strategies.moe_hc.mixture import (
    BasisNetwork,
    Decomposition,
    Jet,
    blend,
    relative_l2,
    stitch,
)
from strategies.moe_hc.pde.configs import ProblemConfig
from strategies.moe_hc.pde.online import OnlineInstances, ShardSource
from strategies.moe_hc.pde.problems import (
    PDEProblem,
    build_problem,
    load_instances,
    solution_field,
)
from strategies.optim import build_optimizer

SOLVE_DTYPE = torch.float64  # the solve and its adjoint: double, the network: single

OuterLoss = Literal["residual", "data", "both"]


@dataclass
class ExpertTask:
    """What one expert needs: basis fields and data on its constraint points."""

    basis: dict[str, Tensor]  # "<point set>.<field>" -> (B, P, C)
    values: dict[str, Tensor]  # "<point set>" -> (B, P)


@dataclass
class ExpertSolution:
    omega: Tensor  # (B, C)
    iterations: float  # mean over the batch
    residual_rms: float
    converged: float  # fraction of instances within tolerance
    seconds: float
    points: int


def solve_task(problem: PDEProblem, task: ExpertTask, options: SolverOptions) -> ExpertSolution:
    start = time.perf_counter()
    result = levenberg_marquardt(problem.residual, task.basis, task.values, options)
    return ExpertSolution(
        omega=result.omega,
        iterations=float(result.iterations.double().mean()),
        residual_rms=float(result.residual_rms.mean()),
        converged=float(result.converged.double().mean()),
        seconds=time.perf_counter() - start,
        points=sum(t.shape[1] for t in task.basis.values()),
    )


def task_vjp(
    problem: PDEProblem, task: ExpertTask, omega: Tensor, cotangent: Tensor, options: SolverOptions
) -> dict[str, Tensor]:
    cotangent = cotangent.to(SOLVE_DTYPE)
    return implicit_vjp(problem.residual, omega, task.basis, task.values, cotangent, options.ridge)


def stitched_residual(
    problem: PDEProblem,
    jets: dict[str, Jet],
    owners: dict[str, Tensor],
    omegas: list[Tensor],
    values: dict[str, Tensor],
) -> Tensor:
    """r (B, M): every residual of ``problem`` for the stitched solution, Φ ω_k at the
    points expert k owns.

    ``jets`` maps a point set to the basis network's jet there, ``owners`` to each point's
    expert (``Decomposition.owner``). The stitched fields (u, u_t, u_xx, ...) become a
    basis of one function per group with weight 1, so the problem's residual applies
    unchanged. Differentiable in the jets and in every ω_k: its gradient reaches the
    network directly and, through each expert's implicit backward, via ω*.
    """
    names = tuple(c.name for c in problem.coordinates)
    basis = {}
    for name, jet in jets.items():
        stitched = stitch([jet.combine(w, problem.groups) for w in omegas], owners[name])
        for field in problem.fields[name]:
            basis[f"{name}.{field}"] = stitched.field(field, names)
    ones = omegas[0].new_ones(omegas[0].shape[0], problem.groups)
    return vmap(problem.residual)(ones, basis, values)


@dataclass
class PreparedBatch:
    """A training batch between ``prepare`` and ``apply``: what ``combine`` scores the
    experts' blend against, and the basis fields still in the network's graph, which
    ``apply`` backpropagates the experts' dL/dΦ through."""

    features: Tensor  # (B, F) the batch's instances
    reference: Tensor  # (B, D) their reference solution at the data points
    cells: Tensor  # (D, d) the data points
    attached: list[list[Tensor]]  # per expert, its tasks' basis fields before the detach
    outer: dict[str, Tensor]  # point set -> fresh points the stitched residual is scored on
    outer_loss: Tensor | None = None  # combine's loss, still in the network's graph


@dataclass(frozen=True)
class Sampling:
    instances: int  # per batch
    interior: int  # constraint points inside the domain, per batch
    boundary: int  # per initial/boundary point set
    data: int  # reference-grid points per instance scored by the data loss
    residual: int  # fresh interior points per batch scored by the residual loss


class BasisTrainer:
    """The network, its optimizer and the instances: everything but the solves."""

    def __init__(
        self,
        problem: ProblemConfig,
        network: dict[str, int],
        optimizer: OptimizerConfig,
        decomposition: Decomposition,
        sampling: Sampling,
        constraint: Literal["hard", "soft"],
        continuity_weight: float,
        soft_weight: float,
        seed: int,
        device: str = "cpu",
        outer_loss: OuterLoss = "data",
        residual_weight: float = 1.0,
        source: ShardSource | None = None,
        online_directory: str | None = None,
        engine: EngineConfig | None = None,
    ) -> None:
        self.problem = build_problem(problem)
        p = self.problem
        self.decomposition, self.sampling, self.constraint = decomposition, sampling, constraint
        self.continuity_weight, self.soft_weight, self.seed = continuity_weight, soft_weight, seed
        self.outer_loss, self.residual_weight = outer_loss, residual_weight
        self.device = device
        # Online (``problem.online``): batches come from a buffer that ``source``'s solvers
        # fill in ``online_directory`` while training runs; else from the stored train set.
        self.online: OnlineInstances | None = None
        if problem.online is not None:
            if source is None or online_directory is None:
                raise ValueError("online instances need a source of shards and a directory")
            self.online = OnlineInstances(
                p, problem.online, problem.data_seed, online_directory, source, seed
            )
        else:
            self.train = tuple(v.to(device) for v in load_instances(p, "train"))
        self.test = tuple(v.to(device) for v in load_instances(p, "test"))
        self.grid = p.grid().to(device)
        self.network = BasisNetwork(p.coordinates, p.num_features, seed=seed, **network)
        self.network.to(device)
        params = list(self.network.parameters())
        modules: list[torch.nn.Module] = [self.network]
        if constraint == "soft":
            # The soft PINN's weights are learned, one vector for every instance.
            self.head = torch.nn.Parameter(torch.zeros(network["num_basis"], device=device))
            params.append(self.head)
            modules.append(torch.nn.ParameterList([self.head]))  # engines wrap modules
        self.parameters = params
        self.engine = build_engine(
            engine or EngineConfig(), modules, build_optimizer(params, optimizer), device
        )
        self.optimizer = self.engine.optimizer
        self.prepared: PreparedBatch | None = None
        self.sample: dict[str, Tensor] = {}

    # -- sampling -------------------------------------------------------------------
    def _generator(self, t: int, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * stream + t)

    def _constraint_points(self, generator: torch.Generator) -> dict[str, Tensor]:
        s = self.sampling
        points = self.problem.sample_points(generator, s.interior, s.boundary)
        return {name: v.to(self.device) for name, v in points.items()}

    def _instances(self, t: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Batch t's instances (features, solutions): drawn from the online buffer as the
        previous batch left it, or from the stored train set."""
        if self.online is not None:
            _, features, solutions = self.online.next_batch(t, self.sampling.instances, g)
            return features.to(self.device), solutions.to(self.device)
        features, solutions = self.train
        chosen = torch.randperm(len(features), generator=g)[: self.sampling.instances]
        chosen = chosen.to(self.device)
        return features[chosen], solutions[chosen]

    def _batch(self, t: int) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Instances, their reference on sampled grid points, and constraint points of batch t:
        all from (seed, t) and, online, the buffer's checkpointed state, so a resumed run sees
        the same batches."""
        g = self._generator(t)
        features, solutions = self._instances(t, g)
        cells = torch.randperm(self.grid.shape[0], generator=g)[: self.sampling.data]
        cells = cells.to(self.device)
        return features, solutions[:, cells], self.grid[cells], self._constraint_points(g)

    def _outer_points(self, t: int) -> dict[str, Tensor]:
        """Batch t's points for the stitched residual: drawn apart from the constraint
        points, so the loss scores the solution where no solve fitted it (the paper scores
        it on the whole grid while the experts solve on sampled points)."""
        if self.outer_loss == "data":
            return {}
        s = self.sampling
        points = self.problem.sample_points(self._generator(t, 3), s.residual, s.boundary)
        return {name: v.to(self.device) for name, v in points.items()}

    # -- the hard-constraint phases ---------------------------------------------------
    def _tasks(
        self, features: Tensor, points: dict[str, Tensor]
    ) -> tuple[list[ExpertTask], list[list[Tensor]]]:
        """Basis fields at every point set, split by expert: detached copies for the experts,
        and per expert the same fields still in the graph (for apply)."""
        p, values = self.problem, self.problem.values(features, points)
        tasks = [ExpertTask({}, {}) for _ in range(self.decomposition.experts)]
        attached: list[list[Tensor]] = [[] for _ in tasks]
        for name, coords in points.items():
            jet = self.network(coords, features)
            # As in PI-HC-MoE, every expert gets the global initial and boundary conditions:
            # its basis is global, so they pin down what its own PDE points leave free.
            if name == "interior":
                members = self.decomposition.members(coords)
            else:
                members = torch.ones(
                    len(tasks), len(coords), dtype=torch.bool, device=coords.device
                )
            for k, task in enumerate(tasks):
                if not bool(members[k].any()):
                    continue
                for field in p.fields[name]:
                    tensor = jet.field(field, self.network.names)[:, members[k]]
                    attached[k].append(tensor)
                    task.basis[f"{name}.{field}"] = tensor.detach().to("cpu", SOLVE_DTYPE)
                if name in values:
                    task.values[name] = values[name][:, members[k]].to("cpu", SOLVE_DTYPE)
        return tasks, attached

    def prepare(self, t: int) -> list[ExpertTask]:
        self.network.train()
        features, reference, cells, points = self._batch(t)
        with self.engine.autocast():
            tasks, attached = self._tasks(features, points)
        self.prepared = PreparedBatch(features, reference, cells, attached, self._outer_points(t))
        return tasks

    def _prepared(self) -> PreparedBatch:
        if self.prepared is None:
            raise RuntimeError("combine and apply need the batch of a prepare before them")
        return self.prepared

    def _residual_loss(self, batch: PreparedBatch, omegas: list[Tensor]) -> Tensor:
        """Mean over the batch of ‖r‖² of the stitched solution: the PDE residual's mean
        square plus each initial/boundary set's (the solve's own cost, at fresh points)."""
        jets, owners = {}, {}
        for name, coords in batch.outer.items():
            with self.engine.autocast():
                jet = self.network(coords, batch.features)
            jets[name] = Jet(*(t.to(SOLVE_DTYPE) for t in (jet.value, jet.d1, jet.d2)))
            owners[name] = self.decomposition.owner(coords)
        values = self.problem.values(batch.features, batch.outer)
        values = {name: v.to(SOLVE_DTYPE) for name, v in values.items()}
        r = stitched_residual(self.problem, jets, owners, omegas, values)
        return (r * r).sum(-1).mean()

    def combine(self, solutions: list[ExpertSolution]) -> tuple[dict[str, float], list[Tensor]]:
        """The outer loss of the blended prediction; dL/dω*_k for every expert."""
        batch = self._prepared()
        omegas = [s.omega.detach().to(self.device).clone().requires_grad_() for s in solutions]
        with self.engine.autocast():
            phi = self.network.values(batch.cells, batch.features).to(SOLVE_DTYPE)
        shares = self.decomposition.weights(batch.cells).to(SOLVE_DTYPE)
        parts = [solution_field(phi, w, self.problem.groups) for w in omegas]
        u, spread = blend(parts, list(shares))
        data_loss = ((u - batch.reference.to(SOLVE_DTYPE)) ** 2).mean()
        continuity = spread.mean()
        loss = self.continuity_weight * continuity
        if self.outer_loss != "residual":
            loss = loss + data_loss
        metrics = {"train/data_loss": float(data_loss.detach())}
        if self.outer_loss != "data":
            residual_loss = self._residual_loss(batch, omegas)
            loss = loss + self.residual_weight * residual_loss
            metrics["train/residual_loss"] = float(residual_loss.detach())
        # dL/dω* now, for the experts' adjoint solves; the loss keeps its graph, so apply
        # backpropagates it into the network together with their dL/dΦ, in one engine step.
        omega_grads = torch.autograd.grad(loss, omegas, retain_graph=True)
        batch.outer_loss = loss
        metrics["train/loss"] = float(loss.detach())
        metrics["train/continuity"] = float(continuity.detach())
        for k, s in enumerate(solutions):
            metrics.update(
                {
                    f"expert-{k}/train/solver_iterations": s.iterations,
                    f"expert-{k}/train/solve_s": s.seconds,
                    f"expert-{k}/train/constraint_residual_rms": s.residual_rms,
                    f"expert-{k}/train/converged_fraction": s.converged,
                    f"expert-{k}/train/constraint_points": float(s.points),
                }
            )
        return metrics, [g.cpu() for g in omega_grads]

    def apply(self, grads: list[dict[str, Tensor]]) -> float:
        """Backpropagate the outer loss and the experts' dL/dΦ into the network and take
        the engine's step; the norm of the gradient its last step followed.

        ``Σ <Φ, dL/dΦ>`` with dL/dΦ held constant has gradient dL/dΦ · dΦ/dθ, the
        implicit part of the outer loss's gradient, so one scalar carries both parts
        through the engine's backward."""
        batch = self._prepared()
        assert batch.outer_loss is not None, "apply needs the combine of its batch"
        surrogate = batch.outer_loss
        for attached, grad in zip(batch.attached, grads):
            for tensor, key in zip(attached, grad):
                cotangent = grad[key].to(tensor.device, tensor.dtype)
                surrogate = surrogate + (tensor * cotangent).sum()
        self.engine.update(surrogate, measure_norm=True)
        self.prepared = None
        return self.engine.grad_norm

    def local_step(self, t: int, options: SolverOptions) -> dict[str, float]:
        """All five phases in this process: the experts solved one after another."""
        tasks = self.prepare(t)
        solutions = [solve_task(self.problem, task, options) for task in tasks]
        metrics, cotangents = self.combine(solutions)
        grads = [
            task_vjp(self.problem, task, s.omega, c, options)
            for task, s, c in zip(tasks, solutions, cotangents)
        ]
        metrics["train/grad_norm"] = self.apply(grads)
        return metrics

    # -- the soft-constraint baseline ----------------------------------------------------
    def soft_step(self, t: int) -> dict[str, float]:
        self.network.train()
        features, reference, cells, points = self._batch(t)
        p, batch = self.problem, features.shape[0]
        values = p.values(features, points)
        with self.engine.autocast():
            basis = {
                f"{name}.{field}": self.network(coords, features).field(field, self.network.names)
                for name, coords in points.items()
                for field in p.fields[name]
            }
            omega = self.head.expand(batch, -1)
            residual = vmap(p.residual)(omega, basis, values)
            u = solution_field(self.network.values(cells, features), omega, p.groups)
            data_loss = ((u - reference) ** 2).mean()
            penalty = (residual**2).sum(-1).mean()
            loss = data_loss + self.soft_weight * penalty
        self.engine.update(loss)
        return {
            "train/loss": float(loss.detach()),
            "train/data_loss": float(data_loss.detach()),
            "train/residual_penalty": float(penalty.detach()),
        }

    # -- evaluation -------------------------------------------------------------------
    def evaluation_tasks(self) -> list[ExpertTask]:
        """Every held-out instance on a fixed set of constraint points (stream 1)."""
        self.network.eval()
        with torch.no_grad(), self.engine.autocast():
            tasks, _ = self._tasks(self.test[0], self._constraint_points(self._generator(0, 1)))
        return tasks

    def evaluate(self, omegas: list[Tensor] | None) -> dict[str, float]:
        """Relative L2 on the whole reference grid and the PDE residual on held-out points
        (points no solve saw, each scored with the weights of the expert that owns it).
        ``omegas`` None: the soft PINN's learned head."""
        p, (features, solutions) = self.problem, self.test
        batch = features.shape[0]
        with torch.no_grad():
            if omegas is None:
                omegas = [self.head.detach().expand(batch, -1).to(SOLVE_DTYPE)]
            omegas = [w.to(self.device, SOLVE_DTYPE) for w in omegas]
            with self.engine.autocast():
                phi = self.network.values(self.grid, features).to(SOLVE_DTYPE)
            shares = self.decomposition.weights(self.grid).to(SOLVE_DTYPE)
            parts = [solution_field(phi, w, p.groups) for w in omegas]
            u, _ = blend(parts, list(shares))
            reference = solutions.to(SOLVE_DTYPE)
            errors = relative_l2(u, reference)
            held_out = self._constraint_points(self._generator(0, 2))["interior"]
            owner = self.decomposition.owner(held_out)
            with self.engine.autocast():
                jet = self.network(held_out, features)
            squares = []
            for k, w in enumerate(omegas):
                mine = owner == k
                if not bool(mine.any()):
                    continue
                basis = {
                    f"interior.{f}": jet.field(f, self.network.names)[:, mine].to(SOLVE_DTYPE)
                    for f in p.fields["interior"]
                }
                values = p.values(features, {"interior": held_out[mine]})
                values = {name: v.to(SOLVE_DTYPE) for name, v in values.items()}
                squares.append(vmap(p.pde_residual)(w, basis, values) ** 2)
            residual = torch.cat(squares, -1).mean().sqrt()
        self.sample = {"reference": reference[0].float().cpu(), "prediction": u[0].float().cpu()}
        return {
            "eval/rel_l2": float(errors.mean()),
            "eval/rel_l2_max": float(errors.max()),
            "eval/pde_residual": float(residual),
            "eval/mse": float(((u - reference) ** 2).mean()),
        }

    def field_sample(self) -> dict[str, Any]:
        """The first held-out instance at the last evaluation, as 2-D fields to plot:
        (t, x) for a 1-D problem, (x, y) at the final time for a 2-D one."""
        shape = self.problem.grid_shape
        fields: dict[str, Any] = {k: v.reshape(shape).numpy() for k, v in self.sample.items()}
        if len(shape) == 3:
            return {k: v[-1] for k, v in fields.items()} | {"axes": ("x", "y")}
        return fields | {"axes": ("t", "x")}

    # -- online data ------------------------------------------------------------------
    def online_stats(self) -> dict[str, float]:
        """The online buffer's figures since the last call (none offline)."""
        return self.online.stats() if self.online is not None else {}

    def seen_instances(self) -> str:
        """CSV of the online instance ids every batch trained on (empty offline): with
        ``data_seed``, enough to regenerate them (``pde.online.regenerate``)."""
        if self.online is None:
            return ""
        batches, ids = self.online.seen()
        rows = [",".join(map(str, [t, *row])) for t, row in zip(batches, ids)]
        header = ",".join(["batch", *(f"instance_{i}" for i in range(ids.shape[1]))])
        return "\n".join([header, *rows]) + "\n"

    # -- state ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        state = {"network": self.network.state_dict(), "optimizer": self.engine.state()}
        if self.constraint == "soft":
            state["head"] = self.head.detach().clone()
        if self.online is not None:
            state["online"] = self.online.state()
        return state

    def load(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        if self.constraint == "soft":
            with torch.no_grad():
                self.head.copy_(state["head"])
        self.engine.load(state["optimizer"])  # after the weights: DeepSpeed's fp32 masters
        if self.online is not None:
            self.online.load(state["online"])
