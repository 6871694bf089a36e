"""The PDE problems a hard-constrained basis is trained on.

A problem says four things: its domain (the network's coordinates), how an instance is
drawn (a small feature vector: initial-condition coefficients), its reference solution
(from ``strategies.moe_hc.pde.solvers``, stored as Parquet shards), and its constraints: named
point sets ("interior", "initial", "left", ...), the basis fields each needs (u, u_t,
u_xx, ...), and a residual that must vanish on them. Residuals are vmap-compatible
functions of the weights ω, in the form ``strategies.moe_hc.hard_constraint`` solves.

Each point set's residual is divided by √(its point count), so every set weighs its
mean square, however many points an expert happens to hold in it; PDE residuals are
scaled to order one (time measured in units of the horizon T).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor

from orchestrator.data import files
from strategies.moe_hc.mixture import Coordinate
from strategies.moe_hc.pde import shards, solvers
from strategies.moe_hc.pde.configs import (
    DiffusionSorptionConfig,
    HeatConfig,
    NavierStokesConfig,
)


class PDEProblem(Protocol):
    config: Any
    coordinates: tuple[Coordinate, ...]
    num_features: int
    groups: int  # basis groups: 1, or 2 when ω holds two fields (vorticity, streamfunction)
    fields: dict[str, tuple[str, ...]]  # point set -> the basis fields its residual reads
    grid_shape: tuple[int, ...]  # of one reference solution: (nt, nx) or (nt, n, n)

    def sample_features(self, rng: np.random.Generator, count: int) -> np.ndarray: ...
    def reference(self, features: np.ndarray) -> np.ndarray: ...
    def grid(self) -> Tensor: ...
    def sample_points(
        self, generator: torch.Generator, interior: int, boundary: int
    ) -> dict[str, Tensor]: ...
    def values(self, features: Tensor, points: dict[str, Tensor]) -> dict[str, Tensor]: ...
    def residual(
        self, omega: Tensor, basis: dict[str, Tensor], values: dict[str, Tensor]
    ) -> Tensor: ...
    def pde_residual(
        self, omega: Tensor, basis: dict[str, Tensor], values: dict[str, Tensor]
    ) -> Tensor: ...


def _group(basis: Tensor, omega: Tensor, group: int, groups: int) -> Tensor:
    """Σ_i ω_i φ_i over one basis group (the first or second half of the columns)."""
    n = omega.shape[-1] // groups
    return basis[..., group * n : (group + 1) * n] @ omega[group * n : (group + 1) * n]


def solution_field(basis_value: Tensor, omega: Tensor, groups: int) -> Tensor:
    """The predicted solution (group 0) at points with basis values (B, P, C), ω (B, C)."""
    n = omega.shape[-1] // groups
    return (basis_value[..., :n] @ omega[:, :n].unsqueeze(-1)).squeeze(-1)


def _mean_square_form(parts: list[Tensor]) -> Tensor:
    return torch.cat([p / math.sqrt(max(p.shape[-1], 1)) for p in parts], -1)


def _uniform(generator: torch.Generator, count: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(count, generator=generator)


def _box_points(
    generator: torch.Generator, coordinates: tuple[Coordinate, ...], count: int, **fixed: float
) -> Tensor:
    """``count`` uniform points of the domain, with the named coordinates held fixed."""
    columns = [
        torch.full((count,), fixed[c.name])
        if c.name in fixed
        else _uniform(generator, count, c.lo, c.hi)
        for c in coordinates
    ]
    return torch.stack(columns, -1)


class _OneDimensional:
    """Shared by the 1D problems: x in [0,1], t in [0,T], sine-series initial data."""

    config: HeatConfig | DiffusionSorptionConfig
    groups = 1

    def __init__(self, config: HeatConfig | DiffusionSorptionConfig) -> None:
        self.config = config
        self.coordinates = (Coordinate("x", 0.0, 1.0), Coordinate("t", 0.0, config.horizon))

    def _axes(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        return np.linspace(0.0, 1.0, c.nx), np.linspace(0.0, c.horizon, c.nt)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return (self.config.nt, self.config.nx)

    def grid(self) -> Tensor:
        """Points in the order of a flattened (nt, nx) solution: columns (x, t)."""
        x, t = self._axes()
        tt, xx = np.meshgrid(t, x, indexing="ij")
        return torch.tensor(np.stack([xx.ravel(), tt.ravel()], -1), dtype=torch.float32)

    def sample_points(
        self, generator: torch.Generator, interior: int, boundary: int
    ) -> dict[str, Tensor]:
        return {
            "interior": _box_points(generator, self.coordinates, interior),
            "initial": _box_points(generator, self.coordinates, boundary, t=0.0),
            "left": _box_points(generator, self.coordinates, boundary, x=0.0),
            "right": _box_points(generator, self.coordinates, boundary, x=1.0),
        }

    def _sines(self, features: Tensor, x: Tensor) -> Tensor:
        k = torch.arange(1, self.config.modes + 1, dtype=x.dtype) * math.pi
        return features[:, -self.config.modes :] @ torch.sin(k[:, None] * x[None, :])


class HeatProblem(_OneDimensional):
    config: HeatConfig
    fields = {
        "interior": ("u_t", "u_xx"),
        "initial": ("u",),
        "left": ("u",),
        "right": ("u",),
    }

    @property
    def num_features(self) -> int:
        return self.config.modes

    def sample_features(self, rng: np.random.Generator, count: int) -> np.ndarray:
        decay = 1.0 / np.arange(1, self.config.modes + 1)
        return (rng.standard_normal((count, self.config.modes)) * decay).astype(np.float32)

    def reference(self, features: np.ndarray) -> np.ndarray:
        x, t = self._axes()
        return np.stack([solvers.heat_analytic(a, self.config.diffusivity, x, t) for a in features])

    def values(self, features: Tensor, points: dict[str, Tensor]) -> dict[str, Tensor]:
        if "initial" not in points:
            return {}
        return {"initial": self._sines(features, points["initial"][:, 0])}

    def pde_residual(self, omega: Tensor, basis: dict[str, Tensor], values: dict) -> Tensor:
        T, D = self.config.horizon, self.config.diffusivity
        return T * (basis["interior.u_t"] @ omega - D * basis["interior.u_xx"] @ omega)

    def residual(self, omega: Tensor, basis: dict[str, Tensor], values: dict) -> Tensor:
        parts = []
        if "interior.u_t" in basis:
            parts.append(self.pde_residual(omega, basis, values))
        if "initial.u" in basis:
            parts.append(basis["initial.u"] @ omega - values["initial"])
        parts += [basis[f"{side}.u"] @ omega for side in ("left", "right") if f"{side}.u" in basis]
        return _mean_square_form(parts)


class DiffusionSorptionProblem(_OneDimensional):
    """Initial data 1 at x = 0 (matching the inflow boundary) relaxing within a thin layer
    to c0 + Σ c_k sin(kπx) > 0 (the features): smooth, positive, consistent with u(0)=1."""

    config: DiffusionSorptionConfig
    layer = 0.05
    fields = {
        "interior": ("u", "u_t", "u_xx"),
        "initial": ("u",),
        "left": ("u",),
        "right": ("u", "u_x"),
    }

    def __init__(self, config: DiffusionSorptionConfig) -> None:
        super().__init__(config)
        self.physics = solvers.SorptionParameters()
        p = self.physics
        self.sorption = (1 - p.phi) / p.phi * p.rho_s * p.k_f * p.n_f

    @property
    def num_features(self) -> int:
        return 1 + self.config.modes

    def sample_features(self, rng: np.random.Generator, count: int) -> np.ndarray:
        base = rng.uniform(0.05, 0.25, (count, 1))
        # |Σ c_k| <= 0.75 c0: the initial data stays positive.
        wiggle = rng.uniform(-1, 1, (count, self.config.modes)) * base / (self.config.modes + 1)
        return np.concatenate([base, wiggle], 1).astype(np.float32)

    def _initial(self, features: Tensor, x: Tensor) -> Tensor:
        inflow = torch.exp(-x / self.layer)
        background = features[:, :1] + self._sines(features, x)
        return inflow + (1 - inflow) * background

    def reference(self, features: np.ndarray) -> np.ndarray:
        x, t = self._axes()
        u0 = self._initial(torch.tensor(features, dtype=torch.float64), torch.tensor(x)).numpy()
        return np.stack([solvers.diffusion_sorption(u, x, t, self.physics) for u in u0])

    def values(self, features: Tensor, points: dict[str, Tensor]) -> dict[str, Tensor]:
        if "initial" not in points:
            return {}
        return {"initial": self._initial(features, points["initial"][:, 0])}

    def pde_residual(self, omega: Tensor, basis: dict[str, Tensor], values: dict) -> Tensor:
        p, T = self.physics, self.config.horizon
        u = basis["interior.u"] @ omega
        retardation = 1 + self.sorption * u.clamp_min(p.u_floor) ** (p.n_f - 1)
        return retardation * T * (basis["interior.u_t"] @ omega) - p.D * T * (
            basis["interior.u_xx"] @ omega
        )

    def residual(self, omega: Tensor, basis: dict[str, Tensor], values: dict) -> Tensor:
        parts = []
        if "interior.u" in basis:
            parts.append(self.pde_residual(omega, basis, values))
        if "initial.u" in basis:
            parts.append(basis["initial.u"] @ omega - values["initial"])
        if "left.u" in basis:
            parts.append(basis["left.u"] @ omega - 1.0)
        if "right.u" in basis:  # outflow: D u_x = -u (the sign PDEBench's generator uses)
            parts.append(self.physics.D * basis["right.u_x"] @ omega + basis["right.u"] @ omega)
        return _mean_square_form(parts)


class NavierStokesProblem:
    """Vorticity w and streamfunction ψ, one basis group each (ω = [ω_w, ω_ψ]):

        w_t + ψ_y w_x - ψ_x w_y - ν Δw - f = 0,     Δψ + w = 0,     w(·, 0) = w0.

    Periodicity needs no constraint: the basis is periodic by construction.
    """

    groups = 2
    modes = ((1, 0), (0, 1), (1, 1), (1, -1))
    fields = {
        "interior": ("u", "u_t", "u_x", "u_y", "u_xx", "u_yy"),
        "initial": ("u",),
    }

    def __init__(self, config: NavierStokesConfig) -> None:
        self.config = config
        self.coordinates = (
            Coordinate("x", 0.0, 1.0, periodic=True),
            Coordinate("y", 0.0, 1.0, periodic=True),
            Coordinate("t", 0.0, config.horizon),
        )

    @property
    def num_features(self) -> int:
        return 2 * len(self.modes)

    def sample_features(self, rng: np.random.Generator, count: int) -> np.ndarray:
        shape = (count, self.num_features)
        return (self.config.amplitude * rng.standard_normal(shape) / 2).astype(np.float32)

    def _initial(self, features: Tensor, xy: Tensor) -> Tensor:
        k = torch.tensor(self.modes, dtype=xy.dtype)  # (M, 2)
        phase = 2 * math.pi * (xy @ k.T)  # (P, M)
        half = len(self.modes)
        return features[:, :half] @ torch.cos(phase).T + features[:, half:] @ torch.sin(phase).T

    def _axes(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        return np.arange(c.n) / c.n, np.linspace(0.0, c.horizon, c.nt)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return (self.config.nt, self.config.n, self.config.n)

    def grid(self) -> Tensor:
        """Points in the order of a flattened (nt, n, n) solution ([i, j] = (x_i, y_j))."""
        s, t = self._axes()
        tt, xx, yy = np.meshgrid(t, s, s, indexing="ij")
        columns = [xx.ravel(), yy.ravel(), tt.ravel()]
        return torch.tensor(np.stack(columns, -1), dtype=torch.float32)

    def reference(self, features: np.ndarray) -> np.ndarray:
        s, t = self._axes()
        xx, yy = np.meshgrid(s, s, indexing="ij")
        xy = torch.tensor(np.stack([xx.ravel(), yy.ravel()], -1))
        w0 = self._initial(torch.tensor(features, dtype=torch.float64), xy).numpy()
        forcing = solvers.kolmogorov_forcing(self.config.n)
        n = self.config.n
        return np.stack(
            [
                solvers.navier_stokes_2d(w.reshape(n, n), t, self.config.viscosity, forcing)
                for w in w0
            ]
        )

    def sample_points(
        self, generator: torch.Generator, interior: int, boundary: int
    ) -> dict[str, Tensor]:
        return {
            "interior": _box_points(generator, self.coordinates, interior),
            "initial": _box_points(generator, self.coordinates, boundary, t=0.0),
        }

    def values(self, features: Tensor, points: dict[str, Tensor]) -> dict[str, Tensor]:
        """The initial vorticity, and the forcing f at interior points (a value, not a
        basis field, so the solve treats it as data)."""
        out = {}
        if "interior" in points:
            phase = 2 * math.pi * (points["interior"][:, 0] + points["interior"][:, 1])
            forcing = 0.1 * (torch.sin(phase) + torch.cos(phase))
            out["interior"] = forcing.expand(features.shape[0], -1)
        if "initial" in points:
            out["initial"] = self._initial(features, points["initial"][:, :2])
        return out

    def pde_residual(self, omega: Tensor, basis: dict[str, Tensor], values: dict) -> Tensor:
        T, nu = self.config.horizon, self.config.viscosity

        def w(name: str) -> Tensor:
            return _group(basis[f"interior.{name}"], omega, 0, 2)

        def psi(name: str) -> Tensor:
            return _group(basis[f"interior.{name}"], omega, 1, 2)

        transport = w("u_t") + psi("u_y") * w("u_x") - psi("u_x") * w("u_y")
        vorticity = T * (transport - nu * (w("u_xx") + w("u_yy")) - values["interior"])
        stream = psi("u_xx") + psi("u_yy") + w("u")
        return torch.cat([vorticity, stream], -1)

    def residual(self, omega: Tensor, basis: dict[str, Tensor], values: dict) -> Tensor:
        parts = []
        if "interior.u" in basis:
            pde = self.pde_residual(omega, basis, values)
            half = pde.shape[-1] // 2
            parts += [pde[:half], pde[half:]]
        if "initial.u" in basis:
            parts.append(_group(basis["initial.u"], omega, 0, 2) - values["initial"])
        return _mean_square_form(parts)


PROBLEMS = {
    "heat": HeatProblem,
    "diffusion_sorption": DiffusionSorptionProblem,
    "navier_stokes": NavierStokesProblem,
}


def build_problem(config: HeatConfig | DiffusionSorptionConfig | NavierStokesConfig) -> PDEProblem:
    return PROBLEMS[config.kind](config)


def dataset_directory(config: BaseModel) -> str:
    """Instances depend on every field but ``root`` and ``online`` (how they are delivered,
    not what they are): the directory is named by their digest. A path or a pyarrow.fs URI,
    as ``root`` is."""
    described = config.model_dump(mode="json", exclude={"root", "online"})
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
    return files.join(config.root, "pde", f"{config.kind}-{digest}")


def online_directory(config: BaseModel, run: str) -> str:
    """Where one run keeps its buffer of online shards: beside the problem's dataset, so a
    resumed run (same name) finds the shards its checkpoint lists."""
    return files.join(dataset_directory(config), "online", run)


def load_instances(problem: PDEProblem, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    """(features (n, f), solutions (n, G)) of a split, generated and stored on first use."""
    config = problem.config
    directory = files.join(dataset_directory(config), split)

    def build() -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        rng = np.random.default_rng([config.data_seed, 0 if split == "train" else 1])
        count = config.train_instances if split == "train" else config.test_instances
        features = problem.sample_features(rng, count)
        meta = {"problem": config.kind, "split": split}
        return features, problem.reference(features).astype(np.float32), meta

    shards.materialize(directory, build)
    features, solutions, _ = shards.read_instances(directory)
    return torch.tensor(features), torch.tensor(solutions.reshape(len(solutions), -1))
