"""EGGROLL: evolution strategies with low-rank perturbations (Sarkar et al., 2025,
"Evolution Strategies at the Hyperscale"). Pure torch, no Ray.

Member i of a population perturbs every weight matrix W (m x n) by

    sigma * E_i,   E_i = s_i * A_p B_p^T / sqrt(r),   A_p ~ N(0, I_{m x r}), B_p ~ N(0, I_{n x r})

where p is the member's pair and s_i = +1 / -1 for the two mirrored members of a pair
(antithetic sampling; without it p = i and s_i = +1). E_i has unit-variance entries, so
sigma means the same thing at any rank. [A; B] is a window of a shared Gaussian table
(``noise_table``) at an offset hashed from (seed, generation, parameter, pair): nothing
of a member is stored or sent, any process regenerates it. 1-D parameters (biases,
norms' gains) get ordinary dense Gaussian noise, windows of the same table: they are small.

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
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from strategies.replicas import single_thread

if TYPE_CHECKING:
    from strategies.eggroll.config import Schedule, Shaping

_MASK64 = (1 << 64) - 1
# The shared noise table (OpenAI ES's trick, Salimans et al. 2017): 2^24 float32 standard
# normals (64 MiB) drawn once per process from a fixed seed. A pair's noise for a
# parameter is the window of the table at an offset hashed from its key, so
# regenerating a whole population's noise is one row gather per parameter, a copy.
# Measured on the benchmark's MLP (hidden 256-1024, 64-1024 members): one seeded torch
# generator per pair and parameter took 8-46x the gather's time (a quarter of a
# population's evaluation at hidden 256), a counter-based bulk draw (numpy's Philox keyed
# per parameter, pairs as counters, Box-Muller in torch) 5-12x. Windows of different keys
# overlap at different shifts: their entries are uncorrelated, only an exact offset
# collision repeats one.
NOISE_TABLE_SIZE = 1 << 24
_NOISE_TABLE_SEED = 0


def _mix(value: int) -> int:
    """splitmix64's finaliser: neighbouring keys give unrelated seeds."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _mix_array(values: np.ndarray) -> np.ndarray:
    """``_mix`` over a uint64 array (numpy's uint64 arithmetic wraps, as the hash needs)."""
    values = values + np.uint64(0x9E3779B97F4A7C15)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def noise_keys(seed: int, generation: int, pairs: Sequence[int], param: int) -> np.ndarray:
    """The 64-bit key of each pair's noise for one parameter: (seed, generation, param, pair)
    folded through splitmix64, vectorised over the pairs."""
    prefix = 0
    for part in (seed, generation, param):
        prefix = _mix(prefix ^ (part & _MASK64))
    pair_keys = np.asarray(pairs, dtype=np.int64).astype(np.uint64)
    return _mix_array(np.uint64(prefix) ^ pair_keys)


@functools.cache
def noise_table() -> torch.Tensor:
    """The process's shared Gaussian table; the same bits in every process of one build."""
    generator = torch.Generator().manual_seed(_NOISE_TABLE_SEED)
    return torch.randn(NOISE_TABLE_SIZE, generator=generator)


@dataclass(frozen=True)
class NoiseSpec:
    """How a population is perturbed; identical on every worker."""

    rank: int = 1
    antithetic: bool = True
    full_rank: bool = False

    def pairs_and_signs(self, members: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Each member's pair and sign (+1 / -1 for the two members of a mirrored pair)."""
        index = np.asarray(members, dtype=np.int64)
        if self.antithetic:
            return index // 2, 1.0 - 2.0 * (index % 2)
        return index, np.ones(len(index))


def _draw_shape(shape: torch.Size, spec: NoiseSpec) -> tuple[int, ...]:
    """What one pair draws for a parameter: [m + n, r] stacked factors, or the dense shape."""
    if len(shape) == 2 and not spec.full_rank:
        return (shape[0] + shape[1], spec.rank)
    return tuple(shape)


def pairs_noise(
    seed: int, generation: int, pairs: Sequence[int], param: int, shape: torch.Size, spec: NoiseSpec
) -> torch.Tensor:
    """Unit noise of several pairs for one parameter, [P, *draw shape], on the CPU.

    Pair p's slice is the table's window at an offset hashed from its key alone, so any
    subset of pairs, in any order, repeated or not, drawn in any process, is bit-identical
    to the same pairs drawn with others. One gather for all of them.
    """
    draw = _draw_shape(shape, spec)
    span = math.prod(draw)
    table = noise_table()
    if span > table.numel() // 2:
        raise ValueError(
            f"a parameter of shape {tuple(shape)} needs {span:,} noise values per member, more "
            f"than half the noise table ({table.numel():,}); use low-rank noise "
            "(strategy.full_rank: false) for matrices this large"
        )
    offsets = noise_keys(seed, generation, pairs, param) % np.uint64(table.numel() - span + 1)
    windows = table.as_strided((table.numel() - span + 1, span), (1, 1))
    # index_select copies whole rows (measured 6-8x faster than advanced indexing here).
    rows = torch.index_select(windows, 0, torch.from_numpy(offsets.astype(np.int64)))
    return rows.view(len(offsets), *draw)


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
    """Noise of k members for one parameter, on its device: unit factors and a scale each.

    Low rank: ``a`` [k, m, r] holds A_p, ``b`` [k, n, r] holds B_p and ``scale`` [k] holds
    s_i * sigma / sqrt(r). Dense: ``a`` [k, *shape] holds E_p, ``b`` is None and ``scale``
    holds s_i * sigma. The scale stays apart so the forward applies it to the thin
    [k, S, r] product ``x B`` rather than to a factor: mirrored members' factors are the
    same window of the table, only the sign in their scale differs.
    """

    a: torch.Tensor
    b: torch.Tensor | None
    scale: torch.Tensor

    def dense(self) -> torch.Tensor:
        """Every member's full perturbation [k, *shape] (tests and full-rank comparisons)."""
        scale = self.scale.view(-1, *([1] * (self.a.dim() - 1)))
        if self.b is None:
            return self.a * scale
        return torch.einsum("kmr,knr->kmn", self.a, self.b) * scale


def member_noise(
    params: Sequence[torch.Tensor],
    members: Sequence[int],
    seed: int,
    generation: int,
    sigma: float,
    spec: NoiseSpec,
) -> list[ParamNoise]:
    """The perturbations of ``members`` for every parameter, regenerated from their keys.

    Mirrored members share a pair: both gather the pair's window, and differ in the sign
    of their scale.
    """
    pair_of, signs = spec.pairs_and_signs(members)
    out: list[ParamNoise] = []
    for number, param in enumerate(params):
        device, dtype = param.device, param.dtype
        draw = pairs_noise(seed, generation, pair_of, number, param.shape, spec)
        factors = split_factors(draw.to(device, dtype), param.shape, spec)
        low_rank = len(factors) == 2
        scale = sigma / math.sqrt(spec.rank) if low_rank else sigma
        scales = torch.from_numpy(signs * scale).to(device, dtype)
        out.append(ParamNoise(factors[0], factors[1] if low_rank else None, scales))
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


MIN_KEPT_FRACTION = 0.5
"""Under ``run.nonfinite: skip`` a generation goes on without its non-finite members only
while at least this share of the population is left: past it the centre itself, not a
few overflowing perturbations, has diverged, and the run stops."""


def finite_members(fitness: torch.Tensor, antithetic: bool) -> torch.Tensor:
    """Which members enter the update: a finite fitness, and with antithetic sampling a
    finite mirror too (a pair weighs in only by its difference)."""
    finite = torch.isfinite(fitness)
    if antithetic:
        return (finite[0::2] & finite[1::2]).repeat_interleave(2)
    return finite


def enough_members(kept: torch.Tensor) -> bool:
    """Whether a generation keeps enough members to go on (``MIN_KEPT_FRACTION``)."""
    return int(kept.sum()) > 0 and int(kept.sum()) >= MIN_KEPT_FRACTION * kept.numel()


def shape_finite(fitness: torch.Tensor, kept: torch.Tensor, how: Shaping) -> torch.Tensor:
    """Shaped fitness in which a member left out (``kept`` False) weighs nothing, and the
    rest are shaped among themselves and scaled by N / kept, so the ES estimate is the
    mean over the members kept. With every member kept it is ``shape_fitness``."""
    if bool(kept.all()):
        return shape_fitness(fitness, how)
    shaped = torch.zeros(fitness.numel(), dtype=torch.float64)
    count = int(kept.sum())
    if count:
        shaped[kept] = shape_fitness(fitness[kept], how) * (fitness.numel() / count)
    return shaped


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


def _add_low_rank(
    offset: torch.Tensor | None, low: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """offset + low @ factors^T, [k, S, m], in one pass over the output.

    Rank 1 is a broadcast multiply-add: measured 5-11x faster than baddbmm's batched GEMM
    with an inner dimension of 1 (hidden 256 and 1024, 256-1024 members, 16 rows each).
    Higher ranks use baddbmm.
    """
    if low.shape[-1] == 1:
        if offset is None:
            return low * factors.transpose(1, 2)
        return torch.addcmul(offset, low, factors.transpose(1, 2))
    if offset is None:
        return torch.bmm(low, factors.transpose(1, 2))
    return torch.baddbmm(offset, low, factors.transpose(1, 2))


class ESLinear(nn.Linear):
    """nn.Linear that, inside ``population(...)``, evaluates k perturbed copies at once.

    Input [k, ..., n], a slice per member (``x.expand(k, ...)`` shares one without a
    copy); output [k, ..., m]. Low rank: the output starts as each member's bias plus its
    rank-r correction ``sigma s_i (x B_p) A_p^T / sqrt(r)`` (one pass), then one GEMM over
    every member's rows accumulates ``x W^T`` into it in place, as inference's GEMM
    accumulates into its bias. Beyond inference that costs one read of the input (``x B``)
    and no member's weight matrix is ever built. A shared input costs one GEMM for all
    members instead of k.
    """

    state: _PopulationState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        noise = self.state.noise if self.state is not None else {}
        w_noise = noise.get(id(self.weight))
        if w_noise is None:
            return F.linear(x, weight, self.bias)
        k, shape = x.shape[0], x.shape
        rows = x.reshape(k, -1, shape[-1])  # [k, S, n]; an expanded input stays a view
        offset = self._member_bias(noise, k)
        if w_noise.b is None:  # full rank: materialised weights [k, m, n]
            weights = torch.addcmul(weight, w_noise.a, w_noise.scale.view(k, 1, 1))
            y = torch.bmm(rows, weights.transpose(1, 2))
            return (y if offset is None else y + offset).reshape(*shape[:-1], -1)
        shared = rows.stride(0) == 0
        low = torch.bmm(rows, w_noise.b) if not shared else _shared_low(rows[0], w_noise.b)
        low = low * w_noise.scale.view(k, 1, 1)  # [k, S, r]: thin, so scaling here is cheap
        if shared:
            base = F.linear(rows[0], weight)  # [S, m], the same for every member
            offset = base if offset is None else offset + base
        y = _add_low_rank(offset, low, w_noise.a)
        if not shared:
            y.view(-1, y.shape[-1]).addmm_(rows.reshape(-1, shape[-1]), weight.t())
        return y.reshape(*shape[:-1], -1)

    def _member_bias(self, noise: dict[int, ParamNoise], k: int) -> torch.Tensor | None:
        """Each member's perturbed bias [k, 1, m] (or the shared one, or None)."""
        if self.bias is None:
            return None
        b_noise = noise.get(id(self.bias))
        if b_noise is None:
            return self.bias
        return torch.addcmul(self.bias, b_noise.a, b_noise.scale.view(k, 1)).unsqueeze(1)

    def effective_weight(self) -> torch.Tensor:
        return self.weight


def _shared_low(rows: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """x B_p for one input shared by k members: [S, n] @ [n, k r], one GEMM, as [k, S, r]."""
    k, n, r = factors.shape
    stacked = factors.permute(1, 0, 2).reshape(n, k * r)
    return (rows @ stacked).view(-1, k, r).transpose(0, 1)


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
        scale = noise.scale.view(-1, *([1] * tokens.dim()))
        picked = noise.a[members, tokens]  # [k, ..., r] low rank, [k, ..., d] full rank
        if noise.b is None:
            return out + picked * scale
        return out + torch.einsum("k...r,kdr->k...d", picked * scale, noise.b)


class ESLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose gain and bias take each member's dense noise.

    As the reference code treats every parameter that is not a matrix multiply or an
    embedding (its ``Parameter``, ``get_noisy_standard``): a vector gets ordinary dense
    Gaussian noise, which costs d values per member. Input [k, ..., d], a slice per member.
    """

    state: _PopulationState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.state.noise if self.state is not None else {}
        if not self.elementwise_affine or id(self.weight) not in noise:
            return super().forward(x)
        normalised = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return normalised * self._member(self.weight, noise, x) + self._member(self.bias, noise, x)

    def _member(
        self, param: torch.Tensor | None, noise: dict[int, ParamNoise], x: torch.Tensor
    ) -> torch.Tensor | float:
        """Each member's perturbed ``param``, shaped to broadcast over x's middle dims."""
        if param is None:
            return 0.0
        member = param + noise[id(param)].dense()  # [k, *normalized_shape]
        middle = x.dim() - 1 - len(self.normalized_shape)
        return member.view(x.shape[0], *([1] * middle), *self.normalized_shape)


ES_LAYERS = (ESLinear, ESEmbedding, ESLayerNorm)
"""The layers that apply a population's noise in their forward."""


def es_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters ES perturbs and updates, in a fixed order (the ``param`` key index)."""
    return [p for _, p in sorted(model.named_parameters(), key=lambda item: item[0])]


@contextlib.contextmanager
def population(model: nn.Module, noise: Sequence[ParamNoise]) -> Iterator[None]:
    """Run ``model`` as len(noise[0].a) perturbed members; inputs carry a leading member dim."""
    state = _PopulationState()
    state.noise = {id(p): n for p, n in zip(es_parameters(model), noise, strict=True)}
    layers = [m for m in model.modules() if isinstance(m, ES_LAYERS)]
    for layer in layers:
        layer.state = state
    try:
        yield
    finally:
        for layer in layers:
            layer.state = None


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
        """One ascent step on the ES gradient; returns the norm of the update.

        Members whose fitness is not finite are left out (``shape_finite``); with none
        left there is no step. Whether the run goes on after such a generation is the
        driver's call (``run.nonfinite``)."""
        with single_thread(), torch.no_grad():
            kept = finite_members(fitness, self.spec.antithetic)
            if not bool(kept.any()):
                return 0.0
            shaped = shape_finite(fitness, kept, self.shaping)
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
