"""EGGROLL: evolution strategies with low-rank perturbations (Sarkar et al., 2025,
"Evolution Strategies at the Hyperscale"). Pure torch, no Ray.

Member i of a population perturbs every weight matrix W (m x n) by

    sigma * E_i,   E_i = s_i * A_p B_p^T / sqrt(r),   A_p ~ N(0, I_{m x r}), B_p ~ N(0, I_{n x r})

where p is the member's pair and s_i = +1 / -1 for the two mirrored members of a pair
(antithetic sampling; without it p = i and s_i = +1). E_i has unit-variance entries, so
sigma means the same thing at any rank. A and B are drawn from a generator keyed by
(seed, generation, pair, parameter): nothing of a member is stored or sent, any process
regenerates it. 1-D parameters (biases, norms' gains) get ordinary dense Gaussian noise:
they are small.

Forward of a population (``population`` context): ``x W^T`` plus the batched rank-r
correction ``sigma s_i (x B_p) A_p^T / sqrt(r)``, so k members cost k batched inferences
plus r(m+n) multiply-adds per row. The ES gradient

    g = 1/(N sigma) sum_i f_i E_i = 1/(N sigma sqrt(r)) sum_p (f_2p - f_2p+1) A_p B_p^T

is one thin product, (A diag(w)) B^T over the stacked factors, never a full E_i.

``full_rank=True`` is classic OpenAI-style ES (dense E_i of m x n entries per member), the
baseline the low-rank form is measured against.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from strategies.eggroll.config import Schedule, Shaping

_MASK64 = (1 << 64) - 1


def _mix(value: int) -> int:
    """splitmix64's finaliser: neighbouring keys give unrelated seeds."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def noise_seed(seed: int, generation: int, pair: int, param: int) -> int:
    """The generator seed of one pair's noise for one parameter: a hash of the key."""
    value = 0
    for part in (seed, generation, pair, param):
        value = _mix(value ^ (part & _MASK64))
    return value & ((1 << 63) - 1)


@dataclass(frozen=True)
class NoiseSpec:
    """How a population is perturbed; identical on every worker."""

    rank: int = 1
    antithetic: bool = True
    full_rank: bool = False

    def pair_and_sign(self, member: int) -> tuple[int, float]:
        if self.antithetic:
            return member // 2, 1.0 if member % 2 == 0 else -1.0
        return member, 1.0


def _draw_shape(shape: torch.Size, spec: NoiseSpec) -> tuple[int, ...]:
    """What one pair draws for a parameter: [m + n, r] stacked factors, or the dense shape."""
    if len(shape) == 2 and not spec.full_rank:
        return (shape[0] + shape[1], spec.rank)
    return tuple(shape)


def pairs_noise(
    seed: int, generation: int, pairs: Sequence[int], param: int, shape: torch.Size, spec: NoiseSpec
) -> torch.Tensor:
    """Unit noise of several pairs for one parameter, [P, *draw shape], on the CPU.

    Each pair's slice comes from its own generator seeded by its key, so any subset of
    pairs, drawn in any process, is bit-identical to the same pairs drawn with others.
    One generator is re-seeded per pair and draws straight into the output.
    """
    out = torch.empty(len(pairs), *_draw_shape(shape, spec))
    generator = torch.Generator()
    for row, pair in enumerate(pairs):
        generator.manual_seed(noise_seed(seed, generation, pair, param))
        torch.randn(out.shape[1:], generator=generator, out=out[row])
    return out


def split_factors(
    draw: torch.Tensor, shape: torch.Size, spec: NoiseSpec
) -> tuple[torch.Tensor, ...]:
    """[..., m + n, r] -> (A [..., m, r], B [..., n, r]) for a low-rank matrix, else (draw,)."""
    if len(shape) == 2 and not spec.full_rank:
        return draw[..., : shape[0], :], draw[..., shape[0] :, :]
    return (draw,)


def pair_noise(
    seed: int, generation: int, pair: int, param: int, shape: torch.Size, spec: NoiseSpec
) -> tuple[torch.Tensor, ...]:
    """Unit noise of one pair for one parameter: (A, B) low rank, else (E,) or (eps,)."""
    return split_factors(pairs_noise(seed, generation, [pair], param, shape, spec)[0], shape, spec)


@dataclass
class ParamNoise:
    """Noise of k members for one parameter, sign and scale folded in, on its device.

    Low rank: ``a`` [k, m, r] holds s_i * sigma / sqrt(r) * A_p and ``b`` [k, n, r] holds B_p.
    Dense: ``a`` [k, *shape] holds s_i * sigma * E_i and ``b`` is None.
    """

    a: torch.Tensor
    b: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """Every member's full perturbation [k, *shape] (tests and full-rank comparisons)."""
        if self.b is None:
            return self.a
        return torch.einsum("kmr,knr->kmn", self.a, self.b)


def member_noise(
    params: Sequence[torch.Tensor],
    members: Sequence[int],
    seed: int,
    generation: int,
    sigma: float,
    spec: NoiseSpec,
) -> list[ParamNoise]:
    """The perturbations of ``members`` for every parameter, regenerated from their keys.

    Mirrored members share a pair: each pair is drawn once and indexed per member.
    """
    pair_of, signs = zip(*(spec.pair_and_sign(m) for m in members), strict=True)
    pairs = sorted(set(pair_of))
    row_of = {pair: row for row, pair in enumerate(pairs)}
    index = torch.tensor([row_of[p] for p in pair_of])
    out: list[ParamNoise] = []
    for number, param in enumerate(params):
        draw = pairs_noise(seed, generation, pairs, number, param.shape, spec)[index]
        factors = split_factors(draw, param.shape, spec)
        scale = torch.tensor(signs) * sigma
        if len(factors) == 2:
            scale = scale / math.sqrt(spec.rank)
        a = factors[0] * scale.view(-1, *([1] * (factors[0].dim() - 1)))
        b = factors[1] if len(factors) == 2 else None
        device, dtype = param.device, param.dtype
        out.append(ParamNoise(a.to(device, dtype), None if b is None else b.to(device, dtype)))
    return out


def es_gradient(
    params: Sequence[torch.Tensor],
    fitness: torch.Tensor,
    seed: int,
    generation: int,
    sigma: float,
    spec: NoiseSpec,
) -> list[torch.Tensor]:
    """The ES estimate of d E[f] / d theta from the whole population's (shaped) fitness.

    Mirrored members share their noise, so their fitnesses combine first:
    w_p = f_2p - f_2p+1; then each matrix's gradient is one (m x P r) @ (P r x n) product.
    """
    population = fitness.numel()
    if spec.antithetic:
        if population % 2:
            raise ValueError(f"antithetic sampling needs an even population, got {population}")
        weights = fitness[0::2] - fitness[1::2]
    else:
        weights = fitness
    weights = weights.to(torch.float64)
    grads = []
    pairs = list(range(len(weights)))
    for index, param in enumerate(params):
        draw = pairs_noise(seed, generation, pairs, index, param.shape, spec).to(torch.float64)
        factors = split_factors(draw, param.shape, spec)
        if len(factors) == 2:
            a, b = factors  # [P, m, r], [P, n, r]
            m, n = param.shape
            weighted = a * weights.view(-1, 1, 1)
            total = weighted.permute(1, 0, 2).reshape(m, -1) @ b.permute(1, 0, 2).reshape(n, -1).T
            total = total / math.sqrt(spec.rank)
        else:
            total = torch.tensordot(weights, factors[0], dims=1)
        grads.append((total / (population * sigma)).to(param.device, param.dtype))
    return grads


# -- fitness shaping ---------------------------------------------------------------------


def centered_ranks(fitness: torch.Tensor) -> torch.Tensor:
    """Ranks mapped linearly onto [-0.5, 0.5] (Salimans et al. 2017): outliers lose their pull.

    Ties share their average rank, so equal fitnesses (a solved task, a flat landscape)
    give no update instead of one driven by the order of the members.
    """
    n = fitness.numel()
    values = fitness.to(torch.float64)
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank of each distinct value's first copy
    average = first.to(torch.float64) + (counts.to(torch.float64) - 1) / 2
    return average[inverse] / max(n - 1, 1) - 0.5


def zscore(fitness: torch.Tensor) -> torch.Tensor:
    values = fitness.to(torch.float64)
    return (values - values.mean()) / (values.std(unbiased=False) + 1e-8)


def shape_fitness(fitness: torch.Tensor, how: Shaping) -> torch.Tensor:
    if how == "centered_ranks":
        return centered_ranks(fitness)
    if how == "zscore":
        return zscore(fitness)
    return fitness.to(torch.float64)


# -- schedules ---------------------------------------------------------------------------


def scheduled(initial: float, final: float, kind: Schedule, step: int, total: int) -> float:
    """sigma or learning rate at generation ``step`` of ``total``, from initial to final."""
    if kind == "constant" or total <= 1:
        return initial
    progress = min(step, total - 1) / (total - 1)
    if kind == "linear":
        return initial + (final - initial) * progress
    return initial * (final / initial) ** progress


# -- population-batched layers -----------------------------------------------------------


class _PopulationState:
    """Which noise the ES layers of a model add right now (none: plain inference)."""

    def __init__(self) -> None:
        self.noise: dict[int, ParamNoise] = {}


class ESLinear(nn.Linear):
    """nn.Linear that, inside ``population(...)``, evaluates k perturbed copies at once.

    Input [k, ..., n], a slice per member (``x.expand(k, ...)`` shares one without a
    copy); output [k, ..., m]. Low rank: ``x W^T`` is one matmul over every member's rows,
    plus the rank-r correction ``(x B) A^T``; no member's weight matrix is ever built.
    """

    state: _PopulationState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        noise = self.state.noise if self.state is not None else {}
        w_noise = noise.get(id(self.weight))
        if w_noise is None:
            return F.linear(x, weight, self.bias)
        b_noise = noise.get(id(self.bias)) if self.bias is not None else None
        k, shape = x.shape[0], x.shape
        rows = x.reshape(k, -1, shape[-1])  # [k, S, n]
        if w_noise.b is None:  # full rank: materialised weights [k, m, n]
            y = torch.bmm(rows, (weight + w_noise.a).transpose(1, 2))
            if self.bias is not None:
                y = y + self.bias
            if b_noise is not None:
                y = y + b_noise.a.unsqueeze(1)
            return y.reshape(*shape[:-1], -1)
        # One GEMM over every member's rows, then one batched rank-r correction fused
        # with the bias noise: [x B_i, 1] @ [A_i, db_i]^T, added in place by baddbmm.
        low, factors = torch.bmm(rows, w_noise.b), w_noise.a  # [k, S, r], [k, m, r]
        if b_noise is not None:
            low = torch.cat([low, low.new_ones(*low.shape[:-1], 1)], dim=-1)
            factors = torch.cat([factors, b_noise.a.unsqueeze(-1)], dim=-1)
        y = torch.baddbmm(F.linear(rows, weight, self.bias), low, factors.transpose(1, 2))
        return y.reshape(*shape[:-1], -1)

    def effective_weight(self) -> torch.Tensor:
        return self.weight


class ESInt8Linear(ESLinear):
    """ESLinear whose forward uses int8 weights (symmetric, one scale per output row).

    The master weights stay in float for the update; every forward rounds them to the
    int8 grid, as the paper's int8 language model runs its matmuls on int8 weights. The
    low-rank perturbation is added to the accumulator in float, as there.
    """

    def effective_weight(self) -> torch.Tensor:
        scale = self.weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
        return torch.round(self.weight / scale).clamp(-127, 127) * scale


class ESEmbedding(nn.Embedding):
    """nn.Embedding with per-member noise: row t of member i moves by A_i[t] B_i^T.

    Tokens [k, ...], a slice per member; output [k, ..., d].
    """

    state: _PopulationState | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = F.embedding(tokens, self.weight)
        noise = self.state.noise.get(id(self.weight)) if self.state is not None else None
        if noise is None:
            return out
        members = torch.arange(tokens.shape[0]).view(-1, *([1] * (tokens.dim() - 1)))
        picked = noise.a[members, tokens]  # [k, ..., r] low rank, [k, ..., d] full rank
        if noise.b is None:
            return out + picked
        return out + torch.einsum("k...r,kdr->k...d", picked, noise.b)


def es_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters ES perturbs and updates, in a fixed order (the ``param`` key index)."""
    return [p for _, p in sorted(model.named_parameters(), key=lambda item: item[0])]


@contextlib.contextmanager
def population(model: nn.Module, noise: Sequence[ParamNoise]) -> Iterator[None]:
    """Run ``model`` as len(noise[0].a) perturbed members; inputs carry a leading member dim."""
    state = _PopulationState()
    state.noise = {id(p): n for p, n in zip(es_parameters(model), noise, strict=True)}
    layers = [m for m in model.modules() if isinstance(m, (ESLinear, ESEmbedding))]
    for layer in layers:
        layer.state = state
    try:
        yield
    finally:
        for layer in layers:
            layer.state = None


def parameter_checksum(params: Sequence[torch.Tensor]) -> str:
    """A digest of the exact bytes: workers that drifted apart disagree on it."""
    import hashlib

    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """The update must be bit-identical on every replica; a BLAS reduction split over a
    different number of threads rounds differently, so updates run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ESUpdater:
    """Turns a generation's fitnesses into a parameter update, identically everywhere.

    Every population worker and the controller's reference copy run this with the same
    (fitness, generation): only fitness scalars travel, never weights or noise.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        spec: NoiseSpec,
        shaping: Shaping,
        seed: int,
    ) -> None:
        self.params, self.optimizer = list(params), optimizer
        self.spec, self.shaping, self.seed = spec, shaping, seed

    def apply(self, fitness: torch.Tensor, generation: int, sigma: float, lr: float) -> float:
        """One ascent step on the ES gradient; returns the norm of the update."""
        with _single_thread(), torch.no_grad():
            shaped = shape_fitness(fitness, self.shaping)
            grads = es_gradient(self.params, shaped, self.seed, generation, sigma, self.spec)
            before = [p.detach().clone() for p in self.params]
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for param, grad in zip(self.params, grads, strict=True):
                param.grad = -grad  # torch optimizers descend; ES ascends on fitness
            self.optimizer.step()
            for param in self.params:
                param.grad = None
            squared = sum(float(((p - b) ** 2).sum()) for p, b in zip(self.params, before))
        return math.sqrt(squared)
