"""MeZO: zeroth-order SPSA with a seeded direction (Malladi et al., NeurIPS 2023,
"Fine-Tuning Language Models with Just Forward Passes", arXiv:2305.17333). Pure torch, no Ray.

One update t draws, for each of n directions k, z_k ~ N(0, I) over every parameter, keyed by
(run seed, t, k, parameter) so that any process regenerates it and nothing of it is stored
or sent. Both losses are scored on the same minibatch, without autograd:

    g_k = (L(theta + eps z_k) - L(theta - eps z_k)) / (2 eps)          (a scalar)
    theta <- theta - lr * (1/n sum_k g_k z_k + wd * theta)              (wd: not on biases, norms)

g_k z_k is an unbiased estimate of the gradient of the eps-smoothed loss (exact directional
derivative on a quadratic), n > 1 is the paper's n-SPSA. The memory is inference's: z is
regenerated per parameter whenever it is needed (perturb, restore, update), never held whole.

Two ways to score theta +- eps z (``in_place``):

* ``perturbed``: a perturbed copy of the parameters, run through ``torch.func.functional_call``;
  the live weights are never touched, so it is exact, at the cost of one parameter copy.
* ``in_place_pair``: MeZO's own schedule, +eps z, score, -2 eps z, score, +eps z. No copy,
  but the round trip rounds (theta + eps z - 2 eps z + eps z is not theta in floating point,
  more so in low precision): every replica, including the driver's reference, runs the same
  round trip (``drift_``), so they round alike, and parameter checksums catch the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from strategies.eggroll.lowrank import noise_keys

Direction = Callable[[int, torch.Tensor], torch.Tensor]
"""``z(index, param)``: the unit direction of parameter number ``index``, shaped as it."""

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)
"""Layers whose parameters MeZO leaves out of weight decay (its ``layer_norm`` name match)."""


@dataclass(frozen=True)
class SeededDirection:
    """z of direction ``direction`` at update ``update``: one N(0, I) draw per parameter from
    a private generator keyed by (seed, update, direction, parameter) through EGGROLL's
    splitmix keys. Drawn on the CPU in float32, then moved: a GPU generator gives other
    numbers than a CPU one, and the driver's reference replica lives on the CPU. The
    process's global RNG (dropout, data) is never touched, unlike MeZO's
    ``torch.manual_seed``."""

    seed: int
    update: int
    direction: int

    def __call__(self, index: int, param: torch.Tensor) -> torch.Tensor:
        key = int(noise_keys(self.seed, self.update, [self.direction], index)[0])
        generator = torch.Generator().manual_seed(key)
        z = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        return z.to(param.device, param.dtype)


def optimised_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters SPSA moves, by name in a fixed order (the ``index`` of a direction):
    the same on every replica whatever the order modules were registered in."""
    return sorted(model.named_parameters(), key=lambda item: item[0])


def decayed(model: nn.Module) -> dict[str, bool]:
    """Whether each parameter takes weight decay: not a bias, not a norm layer's gain or
    shift (MeZO's ``zo_update`` skips names with ``bias`` / ``layer_norm``; matched here by
    layer type, so it does not hang on how a model names its modules)."""
    in_norm = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, NORM_LAYERS)
        for name, _ in module.named_parameters(recurse=False)
    }
    return {
        name: not (name in in_norm or name.rsplit(".", 1)[-1] == "bias")
        for name, _ in optimised_parameters(model)
    }


def perturbed(
    params: Sequence[torch.Tensor], direction: Direction, scale: float
) -> list[torch.Tensor]:
    """theta + scale * z as new tensors, the live ones untouched (``functional_call``'s input)."""
    with torch.no_grad():
        return [torch.add(p, direction(i, p), alpha=scale) for i, p in enumerate(params)]


def perturb_(params: Sequence[torch.Tensor], direction: Direction, scale: float) -> None:
    """theta += scale * z in place, one parameter's z alive at a time."""
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(direction(i, p), alpha=scale)


def in_place_pair(
    params: Sequence[torch.Tensor], direction: Direction, eps: float
) -> Iterator[int]:
    """MeZO's in-place schedule: yields +1 with theta + eps z in place, then -1 with
    theta - eps z, then moves back by +eps z (equal to theta up to rounding)."""
    perturb_(params, direction, eps)
    yield 1
    perturb_(params, direction, -2.0 * eps)
    yield -1
    perturb_(params, direction, eps)


def drift_(params: Sequence[torch.Tensor], directions: Sequence[Direction], eps: float) -> None:
    """The in-place round trips of an update without scoring anything: a replica that did
    not score (the driver's reference) rounds exactly as the ones that did."""
    for direction in directions:
        for _ in in_place_pair(params, direction, eps):
            pass


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """The directional derivative along z by central difference (MeZO's ``projected_grad``)."""
    return (loss_plus - loss_minus) / (2.0 * eps)


def projected_gradients(
    loss_plus: np.ndarray, loss_minus: np.ndarray, eps: float
) -> dict[int, float]:
    """g_k of every direction whose two losses are finite, by direction number: a direction
    with an overflowing side is left out of the update, not averaged in as NaN."""
    return {
        k: projected_gradient(float(lp), float(lm), eps)
        for k, (lp, lm) in enumerate(zip(loss_plus, loss_minus, strict=True))
        if math.isfinite(lp) and math.isfinite(lm)
    }


def spsa_update_(
    params: Sequence[torch.Tensor],
    decays: Sequence[bool],
    directions: Sequence[Direction],
    grads: Sequence[float],
    lr: float,
    weight_decay: float,
) -> float:
    """theta <- theta - lr * (1/n sum_k g_k z_k + wd * theta), wd only where ``decays``;
    returns the norm of the step. Nothing happens without a direction (every one dropped).

    The step of a parameter is built before it is applied, so the decay term reads theta
    as it was, as MeZO's single expression does. Elementwise only: every replica on the
    same kind of device computes the same bits, whatever its thread count."""
    if not directions:
        return 0.0
    squared = 0.0
    with torch.no_grad():
        for i, (p, decay) in enumerate(zip(params, decays, strict=True)):
            step = p * weight_decay if decay and weight_decay else torch.zeros_like(p)
            for direction, g in zip(directions, grads, strict=True):
                step.add_(direction(i, p), alpha=g / len(directions))
            p.add_(step, alpha=-lr)
            squared += (lr * float(torch.linalg.vector_norm(step))) ** 2  # no copy of step
    return math.sqrt(squared)
