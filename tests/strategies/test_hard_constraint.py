"""The hard-constraint layer: the solve reaches its tolerance, the implicit backward is exact."""

from __future__ import annotations

import pytest
import torch

from strategies.moe_hc.hard_constraint import (
    SolverOptions,
    constrained_weights,
    implicit_vjp,
    levenberg_marquardt,
)

TIGHT = SolverOptions(tolerance=1e-12, max_iterations=100)


def cubic_residual(omega, basis, values):
    """A nonlinear residual of the kind the PDE problems build: u_t + u³/2 = f, u(0) = u0."""
    u, u_t = basis["phi"] @ omega, basis["dphi"] @ omega
    return torch.cat([u_t + 0.5 * u**3 - values["f"], basis["ic"] @ omega - values["u0"]])


def problem(batch=3, points=10, n=4, seed=0, consistent=False):
    g = torch.Generator().manual_seed(seed)
    basis = {
        k: torch.randn(batch, p, n, generator=g, dtype=torch.float64)
        for k, p in (("phi", points), ("dphi", points), ("ic", 3))
    }
    if consistent:  # data made by a known ω: the residual can vanish
        truth = 0.5 * torch.randn(batch, n, generator=g, dtype=torch.float64)
        u = torch.einsum("bpn,bn->bp", basis["phi"], truth)
        u_t = torch.einsum("bpn,bn->bp", basis["dphi"], truth)
        values = {"f": u_t + 0.5 * u**3, "u0": torch.einsum("bpn,bn->bp", basis["ic"], truth)}
    else:
        values = {
            "f": torch.randn(batch, points, generator=g, dtype=torch.float64),
            "u0": torch.randn(batch, 3, generator=g, dtype=torch.float64),
        }
    return basis, values


@pytest.mark.parametrize("hessian", ["exact", "gauss_newton"])
def test_solve_drives_a_consistent_residual_below_tolerance(hessian):
    basis, values = problem(consistent=True)
    options = SolverOptions(tolerance=1e-10, max_iterations=100, hessian=hessian, ridge=1e-14)
    result = levenberg_marquardt(cubic_residual, basis, values, options)
    assert bool(result.converged.all())
    assert float(result.residual_rms.max()) < 1e-8


def test_solve_reaches_stationarity_when_the_residual_cannot_vanish():
    basis, values = problem()
    result = levenberg_marquardt(cubic_residual, basis, values, TIGHT)
    assert bool(result.converged.all()), result.gradient_norm
    assert float(result.residual_rms.min()) > 0.1  # overdetermined: a true least-squares fit
    # Newton on the exact Hessian converges quadratically: a handful of iterations.
    assert int(result.iterations.max()) < 30


def test_a_linear_residual_gives_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 20, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, 20, generator=g, dtype=torch.float64)
    ridge = 1e-3

    def linear(omega, basis, values):
        return basis["A"] @ omega - values["b"]

    result = levenberg_marquardt(
        linear, {"A": A}, {"b": b}, SolverOptions(tolerance=1e-12, ridge=ridge)
    )
    normal = A.transpose(1, 2) @ A + ridge * torch.eye(5, dtype=torch.float64)
    expected = torch.linalg.solve(normal, (A.transpose(1, 2) @ b.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(result.omega, expected, rtol=1e-9, atol=1e-10)
    assert int(result.iterations.max()) <= 3


def test_implicit_gradient_passes_gradcheck():
    basis, values = problem(batch=2, points=6, n=3, seed=2)
    keys = sorted(basis)
    inputs = [basis[k].clone().requires_grad_() for k in keys]

    def weights(*tensors):
        return constrained_weights(cubic_residual, dict(zip(keys, tensors)), values, TIGHT)

    assert torch.autograd.gradcheck(weights, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_implicit_vjp_matches_central_differences_of_the_solve():
    basis, values = problem(batch=2, points=8, n=3, seed=3)
    g = torch.Generator().manual_seed(4)
    direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in basis.items()}
    cotangent = torch.randn(2, 3, generator=g, dtype=torch.float64)
    omega = levenberg_marquardt(cubic_residual, basis, values, TIGHT).omega
    grads = implicit_vjp(cubic_residual, omega, basis, values, cotangent, TIGHT.ridge)
    analytic = sum((grads[k] * direction[k]).sum() for k in basis)

    eps = 1e-6

    def solved(sign):
        moved = {k: basis[k] + sign * eps * direction[k] for k in basis}
        return levenberg_marquardt(cubic_residual, moved, values, TIGHT).omega

    numeric = ((solved(1) - solved(-1)) / (2 * eps) * cotangent).sum()
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_gauss_newton_and_exact_hessians_find_the_same_optimum():
    basis, values = problem(seed=5)
    exact = levenberg_marquardt(cubic_residual, basis, values, TIGHT)
    options = SolverOptions(tolerance=1e-12, max_iterations=500, hessian="gauss_newton")
    gauss_newton = levenberg_marquardt(cubic_residual, basis, values, options)
    # Both from ω = 0 on the same damping path into the same basin.
    torch.testing.assert_close(exact.omega, gauss_newton.omega, rtol=1e-6, atol=1e-8)
