"""The outer loss PI-HC-MoE trains on: the residual of the stitched solution (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from strategies.config import OptimizerConfig
from strategies.moe_hc.hard_constraint import SolverOptions, constrained_weights
from strategies.moe_hc.mixture import BasisNetwork, Coordinate, Decomposition, Jet, stitch
from strategies.moe_hc.pde.problems import HeatConfig, build_problem
from strategies.moe_hc.training import BasisTrainer, Sampling, stitched_residual

COORDS = (Coordinate("x", 0.0, 1.0), Coordinate("t", 0.0, 2.0))
SPLIT = Decomposition((0.0, 0.0), (1.0, 2.0), (3, 2), overlap=0.2)


@pytest.mark.parametrize("groups", [1, 2])
def test_the_stitched_jet_is_each_points_owners_jet(groups):
    network = BasisNetwork(COORDS, num_features=2, num_basis=4 * groups, width=16, seed=3)
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 2, generator=g)
    omegas = [torch.randn(2, 4 * groups, generator=g) for _ in range(SPLIT.experts)]
    points = torch.rand(300, 2, generator=g) * torch.tensor([1.0, 2.0])
    owner = SPLIT.owner(points)
    jet = network(points, features)
    stitched = stitch([jet.combine(w, groups) for w in omegas], owner)
    for k, w in enumerate(omegas):
        mine = owner == k
        assert bool(mine.any())
        phi = network(points[mine], features)  # Σ_i ω_i φ_i, group by group, directly
        for field, got in (("value", stitched.value), ("d1", stitched.d1), ("d2", stitched.d2)):
            basis = getattr(phi, field).reshape(*getattr(phi, field).shape[:-1], groups, 4)
            expected = (basis * w.reshape(2, 1, groups, 4)).sum(-1)
            torch.testing.assert_close(got[..., mine, :], expected)


def _heat_modes(problem, points: dict[str, torch.Tensor]) -> dict[str, Jet]:
    """Jets of the exact decaying modes sin(kπx) exp(-D k²π² t), k = 1, 2, at each set."""
    diffusivity = problem.config.diffusivity
    jets = {}
    for name, p in points.items():
        x, t = p[:, 0], p[:, 1]
        columns = []
        for k in (1, 2):
            rate = diffusivity * (k * math.pi) ** 2
            s, c = torch.sin(k * math.pi * x), torch.cos(k * math.pi * x)
            e = torch.exp(-rate * t)
            columns.append(
                (
                    s * e,
                    (k * math.pi * c * e, -rate * s * e),
                    (-((k * math.pi) ** 2) * s * e, rate**2 * s * e),
                )
            )
        value = torch.stack([c[0] for c in columns], -1)[None]
        d1 = torch.stack([torch.stack([c[1][j] for c in columns], -1) for j in range(2)])
        d2 = torch.stack([torch.stack([c[2][j] for c in columns], -1) for j in range(2)])
        jets[name] = Jet(value, d1[:, None], d2[:, None])
    return jets


def test_stitched_residual_vanishes_for_an_exact_solution_and_sees_disagreement(tmp_path):
    problem = build_problem(HeatConfig(root=str(tmp_path), modes=2, diffusivity=0.1))
    split = Decomposition((0.0, 0.0), (1.0, 1.0), (2, 1), overlap=0.2)
    g = torch.Generator().manual_seed(0)
    points = {k: v.double() for k, v in problem.sample_points(g, 256, 32).items()}
    jets = _heat_modes(problem, points)
    owners = {k: split.owner(v) for k, v in points.items()}
    a = torch.tensor([[0.7, -0.4]], dtype=torch.float64)
    values = {k: v.double() for k, v in problem.values(a, points).items()}
    omegas = [a.clone().requires_grad_(), a.clone().requires_grad_()]
    r = stitched_residual(problem, jets, owners, omegas, values)
    assert float(r.detach().abs().max()) < 1e-12
    (r * r).sum().backward()
    assert all(float(w.grad.abs().max()) < 1e-12 for w in omegas)  # a minimum: no gradient
    # The second expert's weights solve the PDE but not the initial condition: only the
    # initial points it owns (x > 1/2) see it.
    apart = stitched_residual(problem, jets, owners, [a, a + 0.1], values)
    pde, initial = apart[0, :256], apart[0, 256 : 256 + 32]
    x = points["initial"][:, 0]
    assert float(pde.abs().max()) < 1e-12
    assert float(initial[x < 0.5].abs().max()) < 1e-12
    assert float(initial[x > 0.5].abs().min()) > 0


def test_residual_loss_gradient_reaches_the_network_through_the_implicit_backward(tmp_path):
    """d/dθ of the stitched residual at fresh points, with ω*_k solved per expert and
    differentiated implicitly, against central differences of the whole solve."""
    problem = build_problem(HeatConfig(root=str(tmp_path), modes=2))
    split = Decomposition((0.0, 0.0), (1.0, 1.0), (2, 1), overlap=0.2)
    network = BasisNetwork(problem.coordinates, problem.num_features, 6, width=12, depth=2)
    network.double()
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, problem.num_features, generator=g, dtype=torch.float64)
    solve_at = {k: v.double() for k, v in problem.sample_points(g, 64, 8).items()}
    score_at = {k: v.double() for k, v in problem.sample_points(g, 48, 8).items()}
    options = SolverOptions(tolerance=1e-13, max_iterations=50)

    def loss() -> torch.Tensor:
        omegas = []
        for inside in split.members(solve_at["interior"]):
            basis, values = {}, problem.values(features, solve_at)
            for name, coords in solve_at.items():
                keep = inside if name == "interior" else torch.ones(len(coords), dtype=torch.bool)
                jet = network(coords[keep], features)
                for field in problem.fields[name]:
                    basis[f"{name}.{field}"] = jet.field(field, network.names)
                if name in values:
                    values[name] = values[name][:, keep]
            omegas.append(constrained_weights(problem.residual, basis, values, options))
        jets = {k: network(v, features) for k, v in score_at.items()}
        owners = {k: split.owner(v) for k, v in score_at.items()}
        r = stitched_residual(problem, jets, owners, omegas, problem.values(features, score_at))
        return (r * r).sum(-1).mean()

    params = list(network.parameters())
    analytic = torch.autograd.grad(loss(), params)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    along = sum((a * d).sum() for a, d in zip(analytic, direction))
    eps = 1e-6

    def moved(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        value = float(loss())
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return value

    numeric = (moved(1.0) - moved(-1.0)) / (2 * eps)
    assert abs(float(along)) > 1e-6
    assert float(along) == pytest.approx(numeric, rel=1e-5)


def _trainer(tmp_path, outer_loss: str, splits=(2, 1)) -> BasisTrainer:
    return BasisTrainer(
        problem=HeatConfig(root=str(tmp_path), train_instances=8, test_instances=2, nx=16, nt=9),
        network={"num_basis": 8, "width": 16, "depth": 2},
        optimizer=OptimizerConfig(lr=1e-2),
        decomposition=Decomposition((0.0, 0.0), (1.0, 1.0), splits, 0.1),
        sampling=Sampling(instances=2, interior=64, boundary=8, data=32, residual=48),
        constraint="hard",
        continuity_weight=1.0,
        soft_weight=1.0,
        seed=0,
        outer_loss=outer_loss,
    )


def test_the_residual_loss_trains_without_reading_the_reference(tmp_path):
    options = SolverOptions(max_iterations=20)
    plain, blind = _trainer(tmp_path, "residual"), _trainer(tmp_path, "residual")
    features, solutions = blind.train
    blind.train = (features, torch.zeros_like(solutions))
    for t in range(2):
        first, second = plain.local_step(t, options), blind.local_step(t, options)
    assert first["train/loss"] == second["train/loss"]
    assert "train/residual_loss" in first
    for a, b in zip(plain.network.parameters(), blind.network.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    both = _trainer(tmp_path, "both").local_step(0, options)
    data = _trainer(tmp_path, "data").local_step(0, options)
    assert "train/residual_loss" not in data
    assert both["train/loss"] == pytest.approx(
        data["train/loss"] + both["train/residual_loss"], rel=1e-9
    )
