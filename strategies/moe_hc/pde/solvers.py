"""Reference solvers for the PDE problems: the ground truth a learned solver is scored against.

Three problems, each solved by a standard scheme whose order of accuracy the tests check:

- the 1D heat equation, exactly (a sine series) and by Crank–Nicolson;
- PDEBench's 1D diffusion–sorption equation (Takamoto et al., 2022, used by PI-HC-MoE,
  Chalapathi et al., 2024), by the method of lines with an implicit (BDF) integrator;
- 2D incompressible Navier–Stokes in vorticity form on the periodic unit square (the setup
  of the FNO paper, Li et al., 2021, and PDEBench), pseudo-spectrally.

numpy and scipy only; every function returns float64 arrays with time as the leading axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.integrate import solve_ivp
from scipy.linalg import solve_banded


def _check_output_times(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    if t.ndim != 1 or t.size == 0 or t[0] != 0.0 or np.any(np.diff(t) <= 0):
        raise ValueError(
            f"output times must be a 1D increasing array starting at 0, got {t!r}; "
            "pass e.g. np.linspace(0, t_end, steps)"
        )
    return t


def _uniform_spacing(x: np.ndarray) -> float:
    dx = np.diff(x)
    if x.ndim != 1 or x.size < 3 or not np.allclose(dx, dx[0], rtol=1e-9, atol=0.0):
        raise ValueError("x must be a uniform 1D grid of at least 3 points, endpoints included")
    return float(dx[0])


# --- heat equation ---------------------------------------------------------------------------


def heat_analytic(
    coefficients: np.ndarray, diffusivity: float, x: np.ndarray, t: np.ndarray
) -> np.ndarray:
    """Exact solution of u_t = D u_xx on [0, 1] with u(0, t) = u(1, t) = 0.

    Each sine mode sin(kπx) is an eigenfunction of the Dirichlet Laplacian with eigenvalue
    -(kπ)², so an initial condition Σ_k a_k sin(kπx) (k = 1..K) evolves mode by mode:
    u(x, t) = Σ_k a_k exp(-D (kπ)² t) sin(kπx). Returns shape (len(t), len(x)).
    """
    a = np.asarray(coefficients, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    wavenumbers = np.pi * np.arange(1, a.size + 1)
    decay = np.exp(-diffusivity * np.outer(t, wavenumbers**2))  # (T, K)
    modes = np.sin(np.outer(wavenumbers, x))  # (K, X)
    return (decay * a) @ modes


def heat_finite_difference(
    u0: np.ndarray, diffusivity: float, x: np.ndarray, t: np.ndarray, substeps: int = 20
) -> np.ndarray:
    """Crank–Nicolson for u_t = D u_xx with zero Dirichlet values at both ends of x.

    Crank–Nicolson (1947) averages the centred second difference at the old and new time
    levels, (I - r/2 A) uⁿ⁺¹ = (I + r/2 A) uⁿ with r = D Δt / Δx² and A = tridiag(1, -2, 1):
    second order in Δt and Δx and unconditionally stable, so the step is set by accuracy
    alone (``substeps`` per output interval). The tridiagonal system is solved banded.

    u0 is given on the uniform grid x (endpoints included; its end values are replaced by
    the boundary value 0). Returns shape (len(t), len(x)); t[0] must be 0.
    """
    x = np.asarray(x, dtype=np.float64)
    t = _check_output_times(t)
    dx = _uniform_spacing(x)
    u = np.asarray(u0, dtype=np.float64)[1:-1].copy()
    out = np.zeros((t.size, x.size))
    out[0, 1:-1] = u
    for i, interval in enumerate(np.diff(t), start=1):
        r = diffusivity * (interval / substeps) / dx**2
        lhs = np.empty((3, u.size))  # banded storage of I - r/2 A for solve_banded
        lhs[0], lhs[1], lhs[2] = -r / 2, 1 + r, -r / 2
        for _ in range(substeps):
            rhs = (1 - r) * u
            rhs[1:] += r / 2 * u[:-1]
            rhs[:-1] += r / 2 * u[1:]
            u = solve_banded((1, 1), lhs, rhs)
        out[i, 1:-1] = u
    return out


# --- diffusion–sorption (PDEBench) -----------------------------------------------------------


@dataclass(frozen=True)
class SorptionParameters:
    """PDEBench's diffusion–sorption constants (Takamoto et al., 2022, App. D)."""

    D: float = 5e-4  # effective diffusion coefficient
    phi: float = 0.29  # porosity
    rho_s: float = 2880.0  # bulk density
    k_f: float = 3.5e-4  # Freundlich parameter
    n_f: float = 0.874  # Freundlich exponent
    u_floor: float = 1e-6  # R is evaluated at max(u, u_floor): u^(n_f - 1) is singular at 0

    def retardation(self, u: np.ndarray) -> np.ndarray:
        """Freundlich retardation R(u) = 1 + (1 - φ)/φ ρ_s k_f n_f u^(n_f - 1)."""
        u = np.maximum(np.asarray(u, dtype=np.float64), self.u_floor)
        sorbed = (1 - self.phi) / self.phi * self.rho_s * self.k_f * self.n_f
        return 1 + sorbed * u ** (self.n_f - 1)


def diffusion_sorption(
    u0: np.ndarray,
    x: np.ndarray,
    t: np.ndarray,
    params: SorptionParameters = SorptionParameters(),  # noqa: B008 (frozen, so shared safely)
) -> np.ndarray:
    """PDEBench's diffusion–sorption u_t = D / R(u) u_xx on [0, 1], by the method of lines.

    Boundary conditions: u(0, t) = 1, and the outflow (Cauchy) condition at x = 1 written
    as D u_x(1, t) = -u(1, t): the diffusive flux leaving the domain, -D u_x, equals the
    concentration there. This is the sign PDEBench's generator uses (its ghost value at
    x = 1 is D (u_{N-1} - u_N) / Δx); the paper's text prints u(1, t) = D u_x(1, t), which
    taken literally makes the problem ill-posed: the Laplacian with u_x(1) = u(1) / D and
    D < 1 has a growing eigenmode sinh(κx) with tanh(κ)/κ = D, growth rate D κ² ≈ 1/D.

    Space: second-order centred differences on the vertex grid x (x[0] = 0, x[-1] = 1),
    node 0 held at 1, and the Robin condition imposed through a ghost node
    u_{N+1} = u_{N-1} - 2 Δx u_N / D (the centred difference of the condition, so the
    scheme stays second order up to the boundary). Time: R(u) makes the system stiff where
    u is small, so BDF (scipy's solve_ivp) with the tridiagonal Jacobian sparsity, which
    lets it build the Jacobian from three residual evaluations.

    Returns shape (len(t), len(x)); row 0 is u0 with node 0 set to the boundary value 1.
    """
    x = np.asarray(x, dtype=np.float64)
    t = _check_output_times(t)
    dx = _uniform_spacing(x)
    if not (np.isclose(x[0], 0.0) and np.isclose(x[-1], 1.0)):
        raise ValueError(f"x must run from 0 to 1, got [{x[0]}, {x[-1]}]")
    D = params.D
    ghost_slope = 2 * dx / D

    def rhs(_: float, interior: np.ndarray) -> np.ndarray:
        u = np.concatenate(([1.0], interior))
        curvature = np.empty_like(interior)
        curvature[:-1] = u[:-2] - 2 * u[1:-1] + u[2:]
        curvature[-1] = 2 * u[-2] - (2 + ghost_slope) * u[-1]
        return D / params.retardation(interior) * curvature / dx**2

    unknowns = x.size - 1
    sparsity = sparse.diags([1.0, 1.0, 1.0], [-1, 0, 1], shape=(unknowns, unknowns))
    solution = solve_ivp(
        rhs,
        (0.0, t[-1]),
        np.asarray(u0, dtype=np.float64)[1:],
        method="BDF",
        t_eval=t,
        jac_sparsity=sparsity,
        rtol=1e-6,
        atol=1e-8,
    )
    if not solution.success:
        raise RuntimeError(f"diffusion_sorption: BDF integration failed: {solution.message}")
    out = np.empty((t.size, x.size))
    out[:, 0] = 1.0
    out[:, 1:] = solution.y.T
    return out


# --- 2D Navier–Stokes, vorticity form, periodic ----------------------------------------------


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """x_i = i/n along axis 0 and y_j = j/n along axis 1, broadcastable to (n, n)."""
    points = np.arange(n) / n
    return points[:, None], points[None, :]


def _wavenumbers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Angular wavenumbers of the rfft2 layout: kx (n, 1) along axis 0, ky (1, n//2+1)."""
    kx = 2 * np.pi * np.fft.fftfreq(n, d=1.0 / n)[:, None]
    ky = 2 * np.pi * np.fft.rfftfreq(n, d=1.0 / n)[None, :]
    return kx, ky


def _derivative_wavenumbers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """kx, ky with the Nyquist entries zeroed: an odd derivative of the Nyquist mode is not
    representable as a real field (Trefethen, Spectral Methods in MATLAB, ch. 3)."""
    kx, ky = _wavenumbers(n)
    kx, ky = kx.copy(), ky.copy()
    if n % 2 == 0:
        kx[n // 2] = 0.0
        ky[:, -1] = 0.0
    return kx, ky


def _streamfunction_hat(w_hat: np.ndarray, n: int) -> np.ndarray:
    """ψ̂ from -Δψ = w: ψ̂ = ŵ / |k|², with the mean of ψ (undetermined) set to 0."""
    kx, ky = _wavenumbers(n)
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0
    psi_hat = w_hat / k2
    psi_hat[0, 0] = 0.0
    return psi_hat


def ns_velocity(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Velocity (u, v) = (ψ_y, -ψ_x) of a vorticity field w on the periodic unit square.

    w[i, j] is the value at (x_i, y_j) = (i/n, j/n). Divergence free by construction:
    u_x + v_y = ψ_yx - ψ_xy = 0, exactly so for the spectral derivatives used here.
    """
    w = np.asarray(w, dtype=np.float64)
    n = w.shape[0]
    kx, ky = _derivative_wavenumbers(n)
    psi_hat = _streamfunction_hat(np.fft.rfft2(w), n)
    u = np.fft.irfft2(1j * ky * psi_hat, s=(n, n))
    v = np.fft.irfft2(-1j * kx * psi_hat, s=(n, n))
    return u, v


def taylor_green_vorticity(n: int, k: int) -> np.ndarray:
    """w0 = sin(2πkx) sin(2πky), an eigenfunction of the Laplacian (|k|² = 2k²).

    Its streamfunction is w0 / ((2π)² 2k²), so u·∇w = J(ψ, w) = 0: the nonlinear term
    vanishes and the mode only decays, as exp(-ν (2π)² 2k² t), an exact solution to test
    the viscous part of a solver against. Requires k < n/2 to be resolved.
    """
    x, y = _grid(n)
    return np.sin(2 * np.pi * k * x) * np.sin(2 * np.pi * k * y)


def kolmogorov_forcing(n: int) -> np.ndarray:
    """f = 0.1 (sin(2π(x+y)) + cos(2π(x+y))), the forcing of the FNO Navier–Stokes data."""
    x, y = _grid(n)
    phase = 2 * np.pi * (x + y)
    return 0.1 * (np.sin(phase) + np.cos(phase))


def navier_stokes_2d(
    w0: np.ndarray,
    t: np.ndarray,
    viscosity: float,
    forcing: np.ndarray | None = None,
    max_dt: float = 1e-3,
) -> np.ndarray:
    """w_t + u·∇w = ν Δw + f, u = (ψ_y, -ψ_x), -Δψ = w, on the periodic unit square.

    w0[i, j] is the vorticity at (x_i, y_j) = (i/n, j/n), the layout of ``_grid``; the
    output keeps it: shape (len(t), n, n), with t[0] = 0.

    Pseudo-spectral, as the FNO data generator (Li et al., 2021): the advection term is
    formed in physical space from spectral derivatives and its transform truncated by the
    2/3 rule (Orszag, 1971), so quadratic aliasing never reaches the kept modes. Time:
    Crank–Nicolson for the stiff viscous term and Heun's predictor–corrector for advection
    and forcing; both second order, so the scheme is. The internal step is the largest
    Δt <= max_dt that divides each output interval into whole steps, so outputs are hit
    exactly. Explicit advection needs CFL |u| Δt n < 1: keep max_dt small for fast flows.
    """
    w0 = np.asarray(w0, dtype=np.float64)
    n = w0.shape[0]
    if w0.shape != (n, n):
        raise ValueError(f"w0 must be square (n, n), got {w0.shape}")
    t = _check_output_times(t)
    kx, ky = _wavenumbers(n)
    dkx, dky = _derivative_wavenumbers(n)
    laplacian = -(kx**2 + ky**2)
    kept = (np.abs(kx) < 2 * np.pi * n / 3) & (ky < 2 * np.pi * n / 3)
    f_hat = np.zeros_like(laplacian, dtype=complex)
    if forcing is not None:
        f_hat = np.fft.rfft2(np.asarray(forcing, dtype=np.float64))

    def advection_hat(w_hat: np.ndarray) -> np.ndarray:
        psi_hat = _streamfunction_hat(w_hat, n)
        u = np.fft.irfft2(1j * dky * psi_hat, s=(n, n))
        v = np.fft.irfft2(-1j * dkx * psi_hat, s=(n, n))
        w_x = np.fft.irfft2(1j * dkx * w_hat, s=(n, n))
        w_y = np.fft.irfft2(1j * dky * w_hat, s=(n, n))
        return np.fft.rfft2(u * w_x + v * w_y) * kept

    w_hat = np.fft.rfft2(w0)
    out = np.empty((t.size, n, n))
    out[0] = w0
    for i, interval in enumerate(np.diff(t), start=1):
        steps = max(1, int(np.ceil(interval / max_dt - 1e-9)))
        dt = interval / steps
        explicit = 1 + 0.5 * dt * viscosity * laplacian  # CN: (1 - νΔt/2 Δ) ŵⁿ⁺¹ = ...
        implicit = 1 - 0.5 * dt * viscosity * laplacian
        for _ in range(steps):
            advection = advection_hat(w_hat)
            predicted = (explicit * w_hat + dt * (f_hat - advection)) / implicit
            advection = 0.5 * (advection + advection_hat(predicted))
            w_hat = (explicit * w_hat + dt * (f_hat - advection)) / implicit
        out[i] = np.fft.irfft2(w_hat, s=(n, n))
    return out
