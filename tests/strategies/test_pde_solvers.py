"""Reference PDE solvers against exact solutions, steady states and their own refinements."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.moe_hc.pde.solvers import (
    SorptionParameters,
    diffusion_sorption,
    heat_analytic,
    heat_finite_difference,
    kolmogorov_forcing,
    navier_stokes_2d,
    ns_velocity,
    taylor_green_vorticity,
)

HEAT_MODES = np.array([1.0, 0.5, 0.25])


def heat_error(points: int, substeps: int = 20) -> float:
    x = np.linspace(0.0, 1.0, points)
    t = np.linspace(0.0, 0.1, 11)
    exact = heat_analytic(HEAT_MODES, 1.0, x, t)
    return float(np.abs(heat_finite_difference(exact[0], 1.0, x, t, substeps) - exact).max())


def test_heat_analytic_is_the_sine_series() -> None:
    x = np.linspace(0.0, 1.0, 9)
    u = heat_analytic(HEAT_MODES, 0.5, x, np.array([0.0, 0.2]))
    expected = sum(a * np.sin(k * np.pi * x) for k, a in enumerate(HEAT_MODES, start=1))
    np.testing.assert_allclose(u[0], expected, atol=1e-15)
    decayed = sum(
        a * np.exp(-0.5 * (k * np.pi) ** 2 * 0.2) * np.sin(k * np.pi * x)
        for k, a in enumerate(HEAT_MODES, start=1)
    )
    np.testing.assert_allclose(u[1], decayed, atol=1e-15)


def test_crank_nicolson_matches_the_exact_heat_solution() -> None:
    assert heat_error(65) < 5e-4


def test_crank_nicolson_is_second_order_in_space() -> None:
    errors = [heat_error(points) for points in (17, 33, 65)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.5 < coarse / fine < 4.5


def test_sorption_without_sorption_reaches_the_linear_steady_state() -> None:
    # R = 1: u_xx = 0 with u(0) = 1 and D u_x(1) = -u(1) gives u = 1 + c x, D c = -(1 + c).
    params = SorptionParameters(D=0.1, k_f=0.0)
    x = np.linspace(0.0, 1.0, 33)
    u = diffusion_sorption(np.zeros_like(x), x, np.array([0.0, 100.0]), params)
    slope = -1.0 / (1.0 + params.D)
    np.testing.assert_allclose(u[-1], 1.0 + slope * x, atol=1e-6)


def test_sorption_stays_physical_and_starts_at_the_initial_condition() -> None:
    x = np.linspace(0.0, 1.0, 64)
    u0 = np.random.default_rng(0).uniform(0.0, 0.2, x.size)
    u = diffusion_sorption(u0, x, np.linspace(0.0, 500.0, 33))
    assert u.shape == (33, 64) and u.dtype == np.float64
    np.testing.assert_array_equal(u[0, 1:], u0[1:])
    assert np.all(u[:, 0] == 1.0)
    assert u.min() >= -1e-6 and u.max() <= 1.0 + 1e-6
    assert u[-1, 1] > u0[1] + 0.5  # the inflow at x = 0 has moved in


def test_retardation_is_the_freundlich_formula_clamped_at_the_floor() -> None:
    params = SorptionParameters()
    u = np.array([0.01, 0.5, 1.0])
    expected = 1 + (1 - 0.29) / 0.29 * 2880.0 * 3.5e-4 * 0.874 * u ** (0.874 - 1)
    np.testing.assert_allclose(params.retardation(u), expected, rtol=1e-12)
    at_floor = params.retardation(np.array([params.u_floor]))
    np.testing.assert_array_equal(params.retardation(np.array([0.0, -1.0])), at_floor.repeat(2))


def test_sorption_converges_at_second_order_under_refinement() -> None:
    t = np.array([0.0, 100.0, 500.0])
    solutions = [
        diffusion_sorption(np.zeros(points), np.linspace(0.0, 1.0, points), t)
        for points in (33, 65, 129)
    ]
    changes = [
        np.abs(coarse - fine[:, ::2]).max() for coarse, fine in zip(solutions, solutions[1:])
    ]
    assert changes[1] < 3e-4
    assert changes[0] / changes[1] > 3.0


def smooth_vorticity(n: int, seed: int) -> np.ndarray:
    """A random zero-mean field of the wavenumbers |k_x|, |k_y| <= 3, peak magnitude 1."""
    rng = np.random.default_rng(seed)
    x = np.arange(n) / n
    w = np.zeros((n, n))
    for p in range(-3, 4):
        for q in range(1, 4):
            phase = 2 * np.pi * (p * x[:, None] + q * x[None, :]) + rng.uniform(0, 2 * np.pi)
            w += rng.normal() * np.cos(phase)
    return w / np.abs(w).max()


def test_taylor_green_mode_decays_at_the_viscous_rate() -> None:
    k, nu = 2, 5e-3
    w0 = taylor_green_vorticity(32, k)
    t = np.linspace(0.0, 1.0, 6)
    w = navier_stokes_2d(w0, t, nu)
    decay = np.exp(-nu * (2 * np.pi) ** 2 * (k**2 + k**2) * t)
    exact = decay[:, None, None] * w0
    relative = np.abs(w - exact).max(axis=(1, 2)) / np.abs(exact).max(axis=(1, 2))
    assert relative.max() < 1e-6
    assert decay[-1] < 0.25  # the test spans real decay


def test_forced_flow_keeps_zero_mean_and_stays_bounded() -> None:
    n = 32
    w = navier_stokes_2d(
        smooth_vorticity(n, seed=1), np.linspace(0.0, 2.0, 11), 1e-3, kolmogorov_forcing(n)
    )
    assert w.shape == (11, n, n) and np.all(np.isfinite(w))
    assert np.abs(w.mean(axis=(1, 2))).max() < 1e-12
    assert np.abs(w).max() < 2.0


def test_navier_stokes_is_second_order_in_time() -> None:
    n = 32
    w0, forcing = smooth_vorticity(n, seed=2), kolmogorov_forcing(n)
    t = np.array([0.0, 0.5])
    finals = [navier_stokes_2d(w0, t, 1e-3, forcing, max_dt=dt)[-1] for dt in (4e-3, 2e-3, 1e-3)]
    changes = [np.abs(a - b).max() for a, b in zip(finals, finals[1:])]
    assert 3.5 < changes[0] / changes[1] < 4.5


def test_velocity_is_divergence_free_and_follows_the_index_convention() -> None:
    n = 32
    u, v = ns_velocity(smooth_vorticity(n, seed=3))
    k = np.fft.fftfreq(n, d=1.0 / n) * 2 * np.pi
    divergence = np.fft.ifft2(1j * k[:, None] * np.fft.fft2(u) + 1j * k[None, :] * np.fft.fft2(v))
    assert np.abs(divergence).max() < 1e-12 * np.abs(u).max()
    # w = sin(ax) sin(ay) has ψ = w / (2a²): u = ψ_y, v = -ψ_x with w[i, j] at (x_i, y_j).
    a = 2 * np.pi
    x = (np.arange(n) / n)[:, None]
    y = (np.arange(n) / n)[None, :]
    u, v = ns_velocity(taylor_green_vorticity(n, 1))
    np.testing.assert_allclose(u, np.sin(a * x) * np.cos(a * y) / (2 * a), atol=1e-14)
    np.testing.assert_allclose(v, -np.cos(a * x) * np.sin(a * y) / (2 * a), atol=1e-14)


@pytest.mark.parametrize("t", [np.array([0.1, 0.2]), np.array([0.0, 0.2, 0.1])])
def test_output_times_must_start_at_zero_and_increase(t: np.ndarray) -> None:
    with pytest.raises(ValueError, match="starting at 0"):
        navier_stokes_2d(taylor_green_vorticity(8, 1), t, 1e-3)
