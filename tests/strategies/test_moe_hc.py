"""PI-HC-MoE math: Taylor-mode jets, the decomposition, the problems' constraints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import jacrev, vmap

from strategies.moe_hc.hard_constraint import SolverOptions, levenberg_marquardt
from strategies.moe_hc.mixture import BasisNetwork, Coordinate, Decomposition, blend, relative_l2
from strategies.moe_hc.pde.problems import (
    DiffusionSorptionConfig,
    HeatConfig,
    NavierStokesConfig,
    build_problem,
    load_instances,
)

COORDS = (Coordinate("x", 0.0, 1.0, periodic=True), Coordinate("t", 0.0, 2.0))


def test_jets_match_autograd_derivatives():
    network = BasisNetwork(COORDS, num_features=3, num_basis=5, width=16, depth=3, seed=1)
    network.double()
    points = torch.rand(7, 2, dtype=torch.float64) * torch.tensor([1.0, 2.0], dtype=torch.float64)
    features = torch.randn(2, 3, dtype=torch.float64)
    jet = network(points, features)

    def value(point, feature):  # one point, one instance -> (C,)
        return network.values(point[None], feature[None])[0, 0]

    first = vmap(vmap(jacrev(value), (0, None)), (None, 0))(points, features)  # (B, P, C, d)
    second = vmap(vmap(jacrev(jacrev(value)), (0, None)), (None, 0))(points, features)
    torch.testing.assert_close(jet.value, network.values(points, features))
    for j in range(2):
        torch.testing.assert_close(jet.d1[j], first[..., j])
        torch.testing.assert_close(jet.d2[j], second[..., j, j])


def test_periodic_coordinate_gives_a_periodic_basis():
    network = BasisNetwork(COORDS, num_features=1, num_basis=4, seed=0)
    features = torch.randn(1, 1)
    left = network.values(torch.tensor([[0.0, 0.3]]), features)
    right = network.values(torch.tensor([[1.0, 0.3]]), features)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25])
def test_decomposition_is_a_partition_of_unity_over_its_boxes(overlap):
    split = Decomposition((0.0, 0.0), (1.0, 2.0), (3, 2), overlap)
    points = torch.rand(2000, 2) * torch.tensor([1.0, 2.0])
    weights, members = split.weights(points), split.members(points)
    assert split.experts == 6
    torch.testing.assert_close(weights.sum(0), torch.ones(2000))
    assert bool((weights[~members] == 0).all())  # no share outside an expert's widened box
    assert bool(members.any(0).all())
    shared = members.sum(0) > 1
    assert bool(shared.any()) == (overlap > 0)
    # The owner's core box holds the point: x in [i/3, (i+1)/3), t in [j, j+1).
    owner = split.owner(points)
    core = torch.stack([(points[:, 0] * 3).floor().clamp(max=2), points[:, 1].floor()], -1)
    inner = (weights.max(0).values > 0.5).nonzero().squeeze(-1)
    expected = core[inner, 0] * 2 + core[inner, 1]
    assert bool((owner[inner] == expected.long()).all())


def test_blend_spread_vanishes_only_when_experts_agree():
    shares = [torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.0, 0.5, 1.0])]
    same = torch.tensor([[1.0, 2.0, 3.0]])
    u, spread = blend([same, same], shares)
    torch.testing.assert_close(u, same)
    assert float(spread.abs().max()) == 0.0
    u, spread = blend([same, same + 2], shares)
    torch.testing.assert_close(u, torch.tensor([[1.0, 3.0, 5.0]]))
    torch.testing.assert_close(spread, torch.tensor([[0.0, 1.0, 0.0]]))
    assert float(relative_l2(same, same)[0]) == 0.0


def _field_basis(points: torch.Tensor, fns) -> dict[str, torch.Tensor]:
    """Basis fields of hand-written functions of (x, ..., t): (1, P, C) per field."""
    return {name: torch.stack([f(points) for f in column], -1)[None] for name, column in fns}


def test_heat_residual_vanishes_on_the_exact_modes(tmp_path):
    problem = build_problem(HeatConfig(root=str(tmp_path), modes=2, diffusivity=0.1))
    a = torch.tensor([[0.7, -0.4]], dtype=torch.float64)
    points = {k: v.double() for k, v in problem.sample_points(torch.Generator(), 64, 16).items()}
    lam = [0.1 * (k * math.pi) ** 2 for k in (1, 2)]

    def mode(k, derivative=""):
        def f(p):
            x, t = p[:, 0], p[:, 1]
            s, e = torch.sin(k * math.pi * x), torch.exp(-lam[k - 1] * t)
            return {"": s * e, "t": -lam[k - 1] * s * e, "xx": -((k * math.pi) ** 2) * s * e}[
                derivative
            ]

        return f

    basis = {}
    for name, fields in problem.fields.items():
        for field in fields:
            suffix = field.removeprefix("u").removeprefix("_")
            basis[f"{name}.{field}"] = torch.stack(
                [mode(k, suffix)(points[name]) for k in (1, 2)], -1
            )[None]
    values = {k: v.double() for k, v in problem.values(a, points).items()}
    result = levenberg_marquardt(
        problem.residual, basis, values, SolverOptions(tolerance=1e-12, ridge=1e-14)
    )
    torch.testing.assert_close(result.omega, a, rtol=1e-8, atol=1e-10)
    assert float(result.residual_rms[0]) < 1e-10


def test_navier_stokes_residual_vanishes_on_the_forced_mode(tmp_path):
    """w = A(t) g(x, y), g = sin + cos of 2π(x + y): its own streamfunction makes the
    transport term vanish, so A' = -8π²ν A + 0.1 is the exact dynamics."""
    nu = 0.01
    problem = build_problem(NavierStokesConfig(root=str(tmp_path), viscosity=nu, horizon=1.0))
    rate = 8 * math.pi**2 * nu
    zero = torch.zeros(1, problem.num_features, dtype=torch.float64)
    points = {k: v.double() for k, v in problem.sample_points(torch.Generator(), 128, 32).items()}

    def field(p, derivative):
        x, y, t = p[:, 0], p[:, 1], p[:, 2]
        phase = 2 * math.pi * (x + y)
        g = {
            "": torch.sin(phase) + torch.cos(phase),
            "d": 2 * math.pi * (torch.cos(phase) - torch.sin(phase)),
        }
        amplitude = (1 - torch.exp(-rate * t)) * 0.1 / rate
        damp = 0.1 * torch.exp(-rate * t)
        lap = -8 * math.pi**2 * g[""]
        table = {
            "u": amplitude * g[""],
            "u_t": damp * g[""],
            "u_x": amplitude * g["d"],
            "u_y": amplitude * g["d"],
            "u_xx": amplitude * lap / 2,
            "u_yy": amplitude * lap / 2,
        }
        return table[derivative]

    basis = {}
    for name, fields in problem.fields.items():
        for f in fields:
            w = field(points[name], f)
            # group 0: vorticity (w), group 1: streamfunction ψ = w / (8π²)
            basis[f"{name}.{f}"] = torch.stack([w, w / (8 * math.pi**2)], -1)[None]
    values = {k: v.double() for k, v in problem.values(zero, points).items()}
    omega = torch.tensor([1.0, 1.0], dtype=torch.float64)
    residual = problem.residual(
        omega, {k: v[0] for k, v in basis.items()}, {k: v[0] for k, v in values.items()}
    )
    assert float(residual.abs().max()) < 1e-10


@pytest.mark.parametrize(
    "config",
    [
        HeatConfig(train_instances=3, test_instances=2, nx=16, nt=5),
        DiffusionSorptionConfig(train_instances=3, test_instances=2, nx=16, nt=5),
        NavierStokesConfig(train_instances=2, test_instances=2, n=8, nt=3),
    ],
    ids=lambda c: c.kind,
)
def test_stored_instances_start_at_their_initial_condition(config, tmp_path):
    config = config.model_copy(update={"root": str(tmp_path)})
    problem = build_problem(config)
    features, solutions = load_instances(problem, "train")
    again = load_instances(problem, "train")  # read back, not regenerated
    torch.testing.assert_close(again[1], solutions)
    assert solutions.shape == (config.train_instances, int(np.prod(problem.grid_shape)))
    grid = problem.grid()
    first = grid[:, -1] == 0
    start = problem.values(features, {"initial": grid[first]})["initial"]
    if config.kind == "diffusion_sorption":  # node 0 is the inflow boundary, held at 1
        start[:, 0] = 1.0
    torch.testing.assert_close(solutions[:, first], start, rtol=1e-4, atol=1e-5)
