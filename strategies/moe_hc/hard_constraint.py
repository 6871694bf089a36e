"""A hard constraint as a layer: basis weights found by a solve, differentiated implicitly.

Following Négiar et al. (2023) and PI-HC-MoE (Chalapathi et al., 2024), a network gives
basis functions and the solution is their weighted sum u = Φ ω; the weights ω are not
learned but solved for, so that the PDE residual (and the initial/boundary conditions)
vanish on the constraint points:

    ω*(Φ) = argmin_ω  ½‖r(ω; Φ)‖² + ½ λ‖ω‖²         (λ: a small ridge, keeps H invertible)

The solve is Levenberg–Marquardt (Marquardt's diagonal scaling, Nielsen's damping update),
batched over problem instances with ``torch.func.vmap``. The backward pass never unrolls
the iterations: at the optimum g(ω*, Φ) = Jᵀr + λω* = 0, so by the implicit function
theorem dω*/dΦ = -H⁻¹ ∂g/∂Φ with H = ∂g/∂ω, and a vector-Jacobian product costs one
adjoint solve H a = v plus one VJP of g (``implicit_vjp``).

A residual is ``residual(omega, basis, values) -> r``: ``omega`` (n,), ``basis`` maps names
to (P, n) basis evaluations (differentiable), ``values`` maps names to non-differentiable
data (targets, forcing). It must be vmap-compatible: no ``.item()``, no data-dependent
Python branches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad, jacfwd, jacrev, vjp, vmap

Residual = Callable[[Tensor, dict[str, Tensor], dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class SolverOptions:
    tolerance: float = 1e-8  # on ‖g‖∞ = ‖Jᵀr + λω‖∞, the first-order optimality measure
    max_iterations: int = 50
    ridge: float = 1e-6
    damping: float = 1e-6  # initial μ, relative to the diagonal of the model's Hessian
    # "gauss_newton": the classic LM model JᵀJ (no second derivatives of r; linear
    # convergence when the optimum keeps a residual). "exact": the cost's own Hessian,
    # damped the same way (a Newton method with a trust region; quadratic convergence).
    hessian: Literal["gauss_newton", "exact"] = "exact"


@dataclass
class SolveResult:
    omega: Tensor  # (B, n)
    iterations: Tensor  # (B,) iterations each instance took
    residual_rms: Tensor  # (B,) root mean square of r at ω*
    gradient_norm: Tensor  # (B,) ‖g‖∞ at ω*
    converged: Tensor  # (B,) bool


def _cost(residual: Residual, ridge: float) -> Callable[..., Tensor]:
    def cost(omega: Tensor, basis: dict[str, Tensor], values: dict[str, Tensor]) -> Tensor:
        r = residual(omega, basis, values)
        return 0.5 * (r * r).sum() + 0.5 * ridge * (omega * omega).sum()

    return cost


def levenberg_marquardt(
    residual: Residual,
    basis: dict[str, Tensor],
    values: dict[str, Tensor],
    options: SolverOptions = SolverOptions(),
    omega0: Tensor | None = None,
) -> SolveResult:
    """Solve every instance of the batch (leading dimension of every tensor) at once.

    Each instance keeps its own damping and stops on its own; finished instances ride
    along unchanged. A linear residual converges in one or two iterations.
    """
    batch = next(iter(basis.values())).shape[0]
    n = next(iter(basis.values())).shape[-1]
    reference = next(iter(basis.values()))
    omega = (
        torch.zeros(batch, n, dtype=reference.dtype, device=reference.device)
        if omega0 is None
        else omega0.clone()
    )
    ridge = options.ridge
    res = vmap(residual)
    jac = vmap(jacfwd(residual))
    exact = vmap(jacrev(grad(_cost(residual, ridge))))
    eye = torch.eye(n, dtype=omega.dtype, device=omega.device)

    def evaluate(w: Tensor) -> tuple[Tensor, Tensor]:
        r = res(w, basis, values)
        return r, 0.5 * (r * r).sum(-1) + 0.5 * ridge * (w * w).sum(-1)

    def gradient(J: Tensor, r: Tensor, w: Tensor) -> Tensor:
        return (J.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1) + ridge * w

    r, cost = evaluate(omega)
    mu = torch.full((batch,), options.damping, dtype=omega.dtype, device=omega.device)
    nu = torch.full_like(mu, 2.0)
    iterations = torch.zeros(batch, dtype=torch.long, device=omega.device)
    done = torch.zeros(batch, dtype=torch.bool, device=omega.device)
    for _ in range(options.max_iterations):
        J = jac(omega, basis, values)  # (B, M, n)
        g = gradient(J, r, omega)
        done = done | (g.abs().amax(-1) <= options.tolerance)
        if bool(done.all()):
            break
        gauss_newton = J.transpose(1, 2) @ J + ridge * eye
        A = gauss_newton if options.hessian == "gauss_newton" else exact(omega, basis, values)
        scale = torch.diagonal(gauss_newton, dim1=1, dim2=2).clamp_min(1e-12)
        damped = A + torch.diag_embed(mu.unsqueeze(-1) * scale)
        # An exact Hessian far from the optimum may be indefinite even when damped: such an
        # instance takes no step this iteration and is damped harder (a rejected step).
        factor, info = torch.linalg.cholesky_ex(damped)
        positive = info == 0
        step = -torch.cholesky_solve(g.unsqueeze(-1), factor).squeeze(-1)
        step = torch.where(positive.unsqueeze(-1), step, torch.zeros_like(step))
        trial = omega + step
        r_trial, cost_trial = evaluate(trial)
        # Gain ratio: actual over predicted decrease of the quadratic model.
        curvature = (step * (A @ step.unsqueeze(-1)).squeeze(-1)).sum(-1)
        predicted = -(g * step).sum(-1) - 0.5 * curvature
        rho = (cost - cost_trial) / predicted.clamp_min(torch.finfo(omega.dtype).tiny)
        # Close to the optimum the decrease drowns in the rounding of the cost itself; a
        # step of a positive-definite model is then taken on the model's word, and the
        # gradient test above decides when to stop.
        noise_floor = predicted <= 64 * torch.finfo(omega.dtype).eps * cost.abs()
        accept = ((rho > 0) | noise_floor) & positive & ~done
        iterations = iterations + (~done).long()
        omega = torch.where(accept.unsqueeze(-1), trial, omega)
        r = torch.where(accept.unsqueeze(-1), r_trial, r)
        cost = torch.where(accept, cost_trial, cost)
        shrink = torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3)
        mu = torch.where(accept, mu * shrink, torch.where(done, mu, mu * nu))
        nu = torch.where(accept, torch.full_like(nu, 2.0), torch.where(done, nu, 2 * nu))
        # A step too small to change ω in floating point cannot improve it further.
        stalled = step.abs().amax(-1) <= 1e-15 * (1 + omega.abs().amax(-1))
        done = done | (accept & stalled)
    else:  # out of iterations: the last step moved ω after its gradient was taken
        g = gradient(jac(omega, basis, values), r, omega)
    gnorm = g.abs().amax(-1)
    return SolveResult(
        omega=omega,
        iterations=iterations,
        residual_rms=(r * r).mean(-1).sqrt(),
        gradient_norm=gnorm,
        converged=gnorm <= options.tolerance,
    )


def implicit_vjp(
    residual: Residual,
    omega: Tensor,
    basis: dict[str, Tensor],
    values: dict[str, Tensor],
    cotangent: Tensor,
    ridge: float,
) -> dict[str, Tensor]:
    """dL/dΦ from dL/dω* at an optimum, by the implicit function theorem.

    One adjoint solve H a = dL/dω* with the exact Hessian H of the solve's cost (JᵀJ plus
    the residual-curvature term, plus λI), then dL/dΦ = -(∂g/∂Φ)ᵀ a. Nothing from the
    solver's iterations is needed, so memory does not grow with the iteration count.
    """
    cost = _cost(residual, ridge)
    stationarity = grad(cost)  # g(ω, Φ) = Jᵀr + λω
    hessian = vmap(jacrev(stationarity))(omega, basis, values)  # (B, n, n), symmetric
    adjoint = torch.linalg.solve(hessian, cotangent)

    def g_of_basis(b: dict[str, Tensor]) -> Tensor:
        return vmap(stationarity)(omega, b, values)

    _, pullback = vjp(g_of_basis, basis)
    (grads,) = pullback(-adjoint)
    return grads


class _ConstrainedWeights(torch.autograd.Function):
    """ω*(Φ) with the implicit backward, for in-process use (tests, one global solve)."""

    @staticmethod
    def forward(ctx, residual, options, values, keys, *tensors):  # noqa: ANN001, ANN205
        basis = dict(zip(keys, tensors))
        with torch.no_grad():
            result = levenberg_marquardt(residual, basis, values, options)
        ctx.residual, ctx.options, ctx.values, ctx.keys = residual, options, values, keys
        ctx.save_for_backward(result.omega, *tensors)
        return result.omega

    @staticmethod
    def backward(ctx, grad_omega):  # noqa: ANN001, ANN205
        omega, *tensors = ctx.saved_tensors
        basis = dict(zip(ctx.keys, (t.detach() for t in tensors)))
        with torch.enable_grad():
            grads = implicit_vjp(
                ctx.residual, omega, basis, ctx.values, grad_omega, ctx.options.ridge
            )
        return (None, None, None, None, *(grads[k] for k in ctx.keys))


def constrained_weights(
    residual: Residual,
    basis: dict[str, Tensor],
    values: dict[str, Tensor],
    options: SolverOptions = SolverOptions(),
) -> Tensor:
    """The hard-constraint layer: ω* that autograd differentiates through implicitly."""
    keys = tuple(sorted(basis))
    return _ConstrainedWeights.apply(residual, options, values, keys, *(basis[k] for k in keys))
