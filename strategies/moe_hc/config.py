"""`strategy: {kind: moe_hc}`: physics-informed hard-constraint experts' section."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import ConfigError
from strategies.config import MAX_WIDTH, OptimizerConfig, StrategyConfig
from strategies.moe_hc.pde.configs import HeatConfig, ProblemConfig
from strategies.registry import register

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from strategies.moe_hc.hard_constraint import SolverOptions


class BasisConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    functions: int = Field(default=32, gt=0, description="Basis functions per solution field.")
    width: int = Field(default=64, gt=0, le=MAX_WIDTH, description="Units of each tanh layer.")
    depth: int = Field(default=3, ge=1, description="tanh layers.")
    harmonics: int = Field(default=2, ge=1, description="Fourier features of periodic axes.")


class SolverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    hessian: Literal["exact", "gauss_newton"] = Field(
        default="exact", description="exact: Newton with a trust region; gauss_newton: LM."
    )
    tolerance: float = Field(default=1e-8, gt=0, description="On the gradient's max norm.")
    max_iterations: int = Field(default=30, gt=0, description="Per solve.")
    ridge: float = Field(default=1e-6, gt=0, description="λ‖ω‖² keeps the solve well posed.")
    damping: float = Field(default=1e-6, gt=0, description="Initial LM damping.")

    def options(self) -> SolverOptions:
        from strategies.moe_hc.hard_constraint import SolverOptions

        return SolverOptions(**self.model_dump())


@register("strategies.moe_hc.driver:MoEHCStrategy")
class MoEHCConfig(StrategyConfig):
    """PI-HC-MoE: one expert per subdomain solves a hard PDE constraint, implicit backward."""

    kind: Literal["moe_hc"] = Field(default="moe_hc", description="This strategy.")
    problem: ProblemConfig = Field(
        default_factory=HeatConfig, description="The PDE family and its instances."
    )
    constraint: Literal["hard", "soft"] = Field(
        default="hard", description="hard: solved per expert; soft: the PINN penalty baseline."
    )
    experts: dict[str, int] = Field(
        default_factory=dict,
        description="Subdomains along each coordinate, e.g. {x: 2, t: 2}: 4 experts. "
        "Empty: one global solve.",
    )
    overlap: float = Field(
        default=0.1, ge=0, lt=0.5, description="Widening of each subdomain, in its widths."
    )
    basis: BasisConfig = Field(
        default_factory=BasisConfig, description="The network of basis functions."
    )
    solver: SolverConfig = Field(
        default_factory=SolverConfig, description="Each expert's constrained solve."
    )
    instances_per_batch: int = Field(default=4, gt=0, description="PDE instances per batch.")
    constraint_points: int = Field(default=512, gt=0, description="Interior points per batch.")
    boundary_points: int = Field(default=64, gt=0, description="Per initial/boundary set.")
    data_points: int = Field(default=256, gt=0, description="Reference points per instance.")
    batches_per_step: int = Field(default=5, gt=0, description="Batches trained per step.")
    outer_loss: Literal["residual", "data", "both"] = Field(
        default="data",
        description="What trains the basis network through the solves (hard constraint): "
        "residual: the PDE, initial and boundary residuals of the stitched solution (each "
        "point with its owner expert's weights) at fresh points, as PI-HC-MoE trains, no "
        "reference data; data: the squared error against the reference solver; both: their "
        "sum, the residual weighted by residual_weight.",
    )
    residual_weight: float = Field(
        default=1.0, gt=0, description="Weight of the stitched residual in the outer loss."
    )
    residual_points: int = Field(
        default=256, gt=0, description="Fresh interior points per batch for the residual loss."
    )
    continuity_weight: float = Field(
        default=1.0, ge=0, description="Weight of the experts' disagreement where they overlap."
    )
    soft_weight: float = Field(default=1.0, ge=0, description="The soft PINN's residual weight.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=3e-3), description="Trains the basis network."
    )

    def requires_data(self) -> bool:
        return False  # instances come from the problem's own solvers

    def eval_metrics(self, run: RunConfig) -> tuple[str, ...]:
        """``MoEHCTraining.evaluate``'s figures and the driver's time per instance."""
        return (
            "eval/rel_l2",
            "eval/rel_l2_max",
            "eval/pde_residual",
            "eval/mse",
            "eval/inference_s",
        )

    @property
    def expert_count(self) -> int:
        return math.prod(self.experts.values()) if self.constraint == "hard" else 0

    def num_workers(self) -> int:
        online = self.problem.online
        return 1 + self.expert_count + (online.generators if online is not None else 0)

    def hyperparameter_names(self) -> list[str]:
        return ["lr"]

    def gradient_batches_per_step(self) -> int:
        return self.batches_per_step

    def check_against(self, run: RunConfig) -> None:
        from strategies.moe_hc.pde.problems import build_problem

        names = [c.name for c in build_problem(self.problem).coordinates]
        for name, count in self.experts.items():
            if name not in names:
                raise ConfigError(
                    f"strategy.experts.{name}: {self.problem.kind!r} has no coordinate "
                    f"{name!r}; allowed: {names}"
                )
            if count < 1:
                raise ConfigError(f"strategy.experts.{name}: {count}; allowed: 1 or more")
        if self.constraint == "soft" and math.prod(self.experts.values()) > 1:
            raise ConfigError(
                "strategy.experts: the soft-constraint baseline solves nothing, so it has no "
                "experts; remove strategy.experts or set strategy.constraint: hard"
            )
        online = self.problem.online
        if online is not None:
            buffered = online.warmup_shards * online.instances_per_shard
            if self.instances_per_batch > buffered:
                raise ConfigError(
                    f"strategy.instances_per_batch: {self.instances_per_batch} is more than "
                    f"the {buffered} instances the online buffer holds once warm "
                    "(strategy.problem.online.warmup_shards × instances_per_shard); raise "
                    "warmup_shards or lower instances_per_batch"
                )
        elif self.instances_per_batch > self.problem.train_instances:
            raise ConfigError(
                f"strategy.instances_per_batch: {self.instances_per_batch} is more than the "
                f"{self.problem.train_instances} instances of strategy.problem.train_instances"
            )
