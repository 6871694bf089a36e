"""The math of NoProp-DT (arXiv:2503.24322, §2): plain torch, no Ray.

Time runs forward as in the paper: z_0 is pure noise, z_T lies near the label embedding u_y.
Block t (1..T) learns û_t(z_{t-1}, x) ≈ u_y from its own samples of

    q(z_t | y) = N(√ᾱ_t u_y, (1 - ᾱ_t) I)                                        (Eq. 6)

with ᾱ_0 = 0, so that q(z_0 | y) is the prior p(z_0) = N(0, I) (Eq. 7). Noising goes
backwards in t, z_{t-1} = √α_{t-1} z_t + √(1 - α_{t-1}) ε with ᾱ_{t-1} = α_{t-1} ᾱ_t, and
inference runs the Gaussian posterior q(z_t | z_{t-1}, u) forwards with û in place of u.
The posterior's coefficients are derived here (the DDPM posterior with indices relabelled;
``tests/strategies/test_noprop.py`` checks them against plain Gaussian conditioning), not
copied from any typesetting of the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

COSINE_OFFSET = 0.008
"""Nichol & Dhariwal's s (arXiv:2102.09672): it keeps ᾱ_T below 1, so SNR(T) is finite."""


def cosine_alpha_bar(blocks: int, offset: float = COSINE_OFFSET) -> torch.Tensor:
    """ᾱ_0..ᾱ_T (float64, T + 1 values): ᾱ_t = sin²(π/2 · (t/T) / (1 + s)).

    The project's choice: whether the paper fixes a cosine schedule for DT is not known
    (community codes disagree). This is Nichol & Dhariwal's cosine run in NoProp's
    direction, cos²((1 - t/T + s)/(1 + s) · π/2) = sin²(...) above, left unnormalised so
    that ᾱ_0 = 0 exactly (z_0 is the prior) and ᾱ_T = cos²(s/(1 + s) · π/2) < 1."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    t = torch.arange(blocks + 1, dtype=torch.float64)
    return torch.sin(math.pi / 2 * (t / blocks) / (1 + offset)) ** 2


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t)."""
    return alpha_bar / (1 - alpha_bar)


def denoising_weights(alpha_bar: torch.Tensor, eta: float) -> torch.Tensor:
    """Weight of block t's ‖û_t - u_y‖² (index t - 1): (T/2) · η · (SNR(t) - SNR(t-1)).

    Eq. 8 takes the expectation over t ~ U{1..T} of T/2 · η · ΔSNR · ‖·‖²; every block here
    trains on its own t, so block t's term is the summand, and the mean over blocks is Eq. 8's
    expectation."""
    ratio = snr(alpha_bar)
    blocks = alpha_bar.numel() - 1
    return blocks / 2 * eta * (ratio[1:] - ratio[:-1])


def posterior_coefficients(
    alpha_bar: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, c), index t - 1 for t = 1..T: q(z_t | z_{t-1}, u) = N(a_t u + b_t z_{t-1}, c_t I).

    With α_{t-1} = ᾱ_{t-1} / ᾱ_t:
    a_t = √ᾱ_t (1 - α_{t-1}) / (1 - ᾱ_{t-1}),  b_t = √α_{t-1} (1 - ᾱ_t) / (1 - ᾱ_{t-1}),
    c_t = (1 - ᾱ_t)(1 - α_{t-1}) / (1 - ᾱ_{t-1}).
    At t = 1, ᾱ_0 = 0 gives a_1 = √ᾱ_1, b_1 = 0, c_1 = 1 - ᾱ_1: z_1 is drawn from q(z_1|y)
    itself, so the boundary needs no special case."""
    now, before = alpha_bar[1:], alpha_bar[:-1]
    step = before / now  # α_{t-1}
    a = now.sqrt() * (1 - step) / (1 - before)
    b = step.sqrt() * (1 - now) / (1 - before)
    c = (1 - now) * (1 - step) / (1 - before)
    return a, b, c


def sample_q(
    u: torch.Tensor, alpha_bar_t: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z_t ~ q(z_t | y) = N(√ᾱ_t u_y, (1 - ᾱ_t) I) for each row u_y of ``u`` (Eq. 6)."""
    noise = torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
    return math.sqrt(alpha_bar_t) * u + math.sqrt(1 - alpha_bar_t) * noise


def posterior_step(
    u_hat: torch.Tensor,
    z_prev: torch.Tensor,
    t: int,
    coefficients: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    noise: torch.Tensor,
) -> torch.Tensor:
    """One inference step (Eq. 3): z_t = a_t û + b_t z_{t-1} + √c_t ε, block t in 1..T."""
    a, b, c = (float(v[t - 1]) for v in coefficients)
    return a * u_hat + b * z_prev + math.sqrt(c) * noise


def infer_chain(
    denoisers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    alpha_bar: torch.Tensor,
    z0: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """z_T from z_0 through every block in order: ``denoisers[t - 1](z_{t-1})`` is û_t.
    The workers run the same steps one per actor; this is the whole chain in one place."""
    coefficients = posterior_coefficients(alpha_bar)
    z = z0
    for t, denoise in enumerate(denoisers, start=1):
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        z = posterior_step(denoise(z), z, t, coefficients, noise)
    return z


def denoising_loss(u_hat: torch.Tensor, u: torch.Tensor, weight: float) -> torch.Tensor:
    """Block t's term of Eq. 8: weight_t · ‖û - u_y‖², summed over the embedding, averaged
    over the batch."""
    return weight * (u_hat - u).pow(2).sum(dim=1).mean()


def kl_to_prior(u: torch.Tensor, alpha_bar_0: float) -> torch.Tensor:
    """D_KL(q(z_0|y) ‖ N(0, I)) of Eq. 8, averaged over the batch:
    ½ (ᾱ_0 ‖u‖² + d (1 - ᾱ_0) - d - d log(1 - ᾱ_0)). It is 0 with the cosine schedule's
    ᾱ_0 = 0 (q(z_0|y) is the prior), so it constrains a learned embedding only under a
    schedule with ᾱ_0 > 0."""
    d = u.shape[1]
    variance = 1 - alpha_bar_0
    per_example = alpha_bar_0 * u.pow(2).sum(dim=1) + d * (variance - 1 - math.log(variance))
    return 0.5 * per_example.mean()


def classifier_loss(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    u: torch.Tensor,
    y: torch.Tensor,
    alpha_bar_T: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8's −log p̂(y | z_T) with z_T ~ q(z_T | y) (not the chain's output: the classifier
    never sees the blocks in training); the loss and the correct predictions."""
    logits = classifier(sample_q(u, alpha_bar_T))
    return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).sum()
