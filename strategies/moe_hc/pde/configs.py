"""The PDE problems' config sections (`strategy.problem`): plain pydantic, no torch, so a
run config validates without loading the solvers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.locations import DATA_ROOT_ENV, data_root


class OnlineDataConfig(BaseModel):
    """Training instances generated while training runs (Meyer et al., ICML 2023): solver
    actors fill a bounded buffer of Parquet shards under ``root`` and the trainer draws its
    batches from whatever the buffer holds, never waiting once ``warmup_shards`` are in."""

    model_config = ConfigDict(extra="forbid")

    generators: int = Field(default=1, ge=1, description="Solver actors generating instances.")
    instances_per_shard: int = Field(
        default=4, ge=1, description="Instances per shard: the unit generated, stored, evicted."
    )
    buffer_shards: int = Field(
        default=16,
        ge=1,
        description="Most shards kept; when full, a new shard replaces one whose every "
        "instance was trained on at least once (Melissa's reservoir).",
    )
    warmup_shards: int = Field(
        default=2, ge=1, description="Shards in the buffer before the first batch is drawn."
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> OnlineDataConfig:
        if self.warmup_shards > self.buffer_shards:
            raise ValueError(
                f"warmup_shards ({self.warmup_shards}) is more than buffer_shards "
                f"({self.buffer_shards}); the buffer could never warm up: lower warmup_shards"
            )
        return self


class _ProblemSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_instances: int = Field(default=64, gt=0, description="Instances trained on.")
    test_instances: int = Field(default=16, gt=0, description="Held-out instances.")
    data_seed: int = Field(default=0, ge=0, description="Seeds the instances drawn.")
    root: str = Field(
        default_factory=data_root,
        description=f"Where instances are stored: a path or a pyarrow.fs URI (s3://, gs://, "
        f"hdfs://, file://); default: ${DATA_ROOT_ENV}, else .unlocked/datasets.",
    )
    online: OnlineDataConfig | None = Field(
        default=None,
        description="Generate training instances while training runs (train_instances is "
        "then unused); unset: train_instances generated once, before training.",
    )


class HeatConfig(_ProblemSection):
    """u_t = D u_xx on [0,1]×[0,T], zero at both ends: linear, with an exact solution."""

    kind: Literal["heat"] = Field(default="heat", description="This problem.")
    diffusivity: float = Field(default=0.05, gt=0, description="D, the diffusion coefficient.")
    horizon: float = Field(default=1.0, gt=0, description="T.")
    modes: int = Field(default=3, gt=0, description="Sine modes in the initial condition.")
    nx: int = Field(default=64, ge=8, description="Reference solution's points in x.")
    nt: int = Field(default=33, ge=2, description="Reference solution's points in t.")


class DiffusionSorptionConfig(_ProblemSection):
    """PDEBench's diffusion–sorption: u_t = D/R(u) u_xx, Freundlich retardation R(u)."""

    kind: Literal["diffusion_sorption"] = Field(
        default="diffusion_sorption", description="This problem."
    )
    horizon: float = Field(default=500.0, gt=0, description="T (PDEBench: 500 s).")
    modes: int = Field(default=3, gt=0, description="Sine modes in the initial condition.")
    nx: int = Field(default=64, ge=8, description="Reference solution's points in x.")
    nt: int = Field(default=51, ge=2, description="Reference solution's points in t.")


class NavierStokesConfig(_ProblemSection):
    """2D incompressible Navier–Stokes, vorticity form, periodic, Kolmogorov forcing."""

    kind: Literal["navier_stokes"] = Field(default="navier_stokes", description="This problem.")
    viscosity: float = Field(default=1e-3, gt=0, description="ν, the kinematic viscosity.")
    horizon: float = Field(default=1.0, gt=0, description="T.")
    amplitude: float = Field(default=1.0, gt=0, description="Scale of the initial vorticity.")
    n: int = Field(default=32, ge=8, description="Grid points per side.")
    nt: int = Field(default=11, ge=2, description="Reference solution's points in t.")


ProblemConfig = Annotated[
    HeatConfig | DiffusionSorptionConfig | NavierStokesConfig, Field(discriminator="kind")
]
