"""PI-HC-MoE math: the basis network, the domain decomposition into experts, the losses.

The network maps a point z of the PDE's domain (and the instance's features: its initial
condition, its parameters) to C basis functions φ(z). Constraints need derivatives of
every basis function with respect to z; instead of C backward passes per point, the
network carries them forward (Taylor mode): for a tanh layer h = tanh(a),
h' = (1-h²) a' and h'' = (1-h²) a'' - 2h(1-h²) a'², so value, gradient and the pure
second derivatives along every coordinate cost 1 + 2d batched matmuls per layer and stay
differentiable in the weights by ordinary autograd.

The domain is split into a grid of boxes, one expert each (Chalapathi et al., 2024).
Each box is widened by ``overlap`` of its width on every interior side; an expert solves
its own hard constraint on the constraint points inside its widened box. Continuity
between neighbours is handled explicitly, twice: the prediction is a partition of unity
Σ_k w_k(z) u_k(z) with smooth weights that ramp across each overlap (so it is continuous
by construction), and the training loss penalises the disagreement of overlapping
experts, Σ_k w_k (u_k - u)² (the weighted spread around the blend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Coordinate:
    """One input coordinate of the network: its range, and whether it is periodic."""

    name: str
    lo: float
    hi: float
    periodic: bool = False


@dataclass
class Jet:
    """Values and derivatives of C functions at P points, batched over B instances.

    ``d1[j]`` and ``d2[j]`` are the first and the pure second derivative along coordinate j.
    """

    value: Tensor  # (B, P, C)
    d1: Tensor  # (d, B, P, C)
    d2: Tensor  # (d, B, P, C)

    def combine(self, omega: Tensor, groups: int) -> Jet:
        """The jet of Σ_i ω_i φ_i over each basis group: (B, P, C) with ω (B, C) -> (B, P, G).

        Differentiation is linear, so the weighted sum of the basis jets is the solution's.
        """
        n = omega.shape[-1] // groups
        weights = omega.reshape(omega.shape[0], 1, groups, n)

        def contract(t: Tensor) -> Tensor:
            return (t.reshape(*t.shape[:-1], groups, n) * weights).sum(-1)

        return Jet(contract(self.value), contract(self.d1), contract(self.d2))

    def field(self, name: str, coordinates: tuple[str, ...]) -> Tensor:
        """``u``, ``u_x`` or ``u_xx`` style names, the coordinate named after ``u_``."""
        if name == "u":
            return self.value
        suffix = name.removeprefix("u_")
        if len(suffix) == 1:
            return self.d1[coordinates.index(suffix)]
        if len(suffix) == 2 and suffix[0] == suffix[1]:
            return self.d2[coordinates.index(suffix[0])]
        raise KeyError(f"basis field {name!r}: expected u, u_<coord> or u_<coord><coord>")


def _embed(points: Tensor, coordinates: tuple[Coordinate, ...], harmonics: int) -> Jet:
    """The network's input features and their derivatives with respect to each coordinate.

    A periodic coordinate enters as sin/cos of its first ``harmonics`` multiples (the basis
    is then periodic by construction); any other is mapped affinely onto [-1, 1].
    """
    d = len(coordinates)
    values, d1, d2 = [], [], []
    for j, c in enumerate(coordinates):
        z = points[:, j]
        zeros = torch.zeros_like(z)
        if c.periodic:
            for m in range(1, harmonics + 1):
                k = 2 * math.pi * m / (c.hi - c.lo)
                s, co = torch.sin(k * z), torch.cos(k * z)
                for v, dv, ddv in ((s, k * co, -k * k * s), (co, -k * s, -k * k * co)):
                    values.append(v)
                    d1.append([dv if i == j else zeros for i in range(d)])
                    d2.append([ddv if i == j else zeros for i in range(d)])
        else:
            scale = 2.0 / (c.hi - c.lo)
            values.append(scale * (z - c.lo) - 1.0)
            d1.append([torch.full_like(z, scale) if i == j else zeros for i in range(d)])
            d2.append([zeros for _ in range(d)])
    value = torch.stack(values, -1).unsqueeze(0)  # (1, P, E)
    first = torch.stack([torch.stack([f[i] for f in d1], -1) for i in range(d)]).unsqueeze(1)
    second = torch.stack([torch.stack([f[i] for f in d2], -1) for i in range(d)]).unsqueeze(1)
    return Jet(value, first, second)


def _tanh_jet(a: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """tanh of a pre-activation and its first and pure second derivatives (chain rule)."""
    h = torch.tanh(a)
    slope = 1 - h * h
    return h, slope * a1, slope * a2 - 2 * h * slope * a1 * a1


class BasisNetwork(nn.Module):
    """φ(z; features): a tanh MLP whose forward pass carries d/dz and d²/dz² along."""

    def __init__(
        self,
        coordinates: tuple[Coordinate, ...],
        num_features: int,
        num_basis: int,
        width: int = 64,
        depth: int = 3,
        harmonics: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.coordinates, self.harmonics = coordinates, harmonics
        embedded = sum(2 * harmonics if c.periodic else 1 for c in coordinates)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.points_in = nn.Linear(embedded, width)
            self.features_in = nn.Linear(num_features, width, bias=False)
            self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
            self.out = nn.Linear(width, num_basis)
        finally:
            torch.random.set_rng_state(generator_state)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.coordinates)

    def values(self, points: Tensor, features: Tensor) -> Tensor:
        """φ alone, (B, P, C): for predictions, where no derivative is needed."""
        e = _embed(points, self.coordinates, self.harmonics).value
        h = torch.tanh(self.points_in(e) + (features @ self.features_in.weight.T).unsqueeze(1))
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.out(h)

    def forward(self, points: Tensor, features: Tensor) -> Jet:
        """``points`` (P, d) shared by the batch, ``features`` (B, f): a Jet of (B, P, C)."""
        e = _embed(points, self.coordinates, self.harmonics)
        a = e.value @ self.points_in.weight.T + self.points_in.bias
        a = a + (features @ self.features_in.weight.T).unsqueeze(1)  # (B, P, W)
        h, h1, h2 = _tanh_jet(a, e.d1 @ self.points_in.weight.T, e.d2 @ self.points_in.weight.T)
        for layer in self.hidden:
            h, h1, h2 = _tanh_jet(layer(h), h1 @ layer.weight.T, h2 @ layer.weight.T)
        w = self.out.weight.T
        return Jet(self.out(h), h1 @ w, h2 @ w)


@dataclass(frozen=True)
class Decomposition:
    """A grid of boxes over the domain, one expert each, widened into overlaps."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]
    splits: tuple[int, ...]  # boxes along each coordinate (1: not split)
    overlap: float = 0.1  # widening of each box on every interior side, in box widths

    @property
    def experts(self) -> int:
        return math.prod(self.splits)

    def _cells(self, k: int) -> list[int]:
        """Expert k's box index along each coordinate (row-major over the grid)."""
        index = []
        for n in reversed(self.splits):
            index.append(k % n)
            k //= n
        return index[::-1]

    def _axis_weights(self, z: Tensor, j: int, i: int) -> Tensor:
        """A 1-D partition of unity along coordinate j, box i: smoothstep ramps of width
        2·overlap·box centred on each interior edge (an indicator when overlap is 0)."""
        n, lo, hi = self.splits[j], self.lo[j], self.hi[j]
        width = (hi - lo) / n
        half = self.overlap * width
        weight = torch.ones_like(z)
        if i > 0:
            weight = weight * _ramp(z, lo + i * width, half)
        if i < n - 1:
            weight = weight * (1 - _ramp(z, lo + (i + 1) * width, half))
        return weight

    def weights(self, points: Tensor) -> Tensor:
        """(K, P): expert k's share of the prediction at each point; columns sum to 1."""
        rows = []
        for k in range(self.experts):
            w = torch.ones(points.shape[0], dtype=points.dtype, device=points.device)
            for j, i in enumerate(self._cells(k)):
                w = w * self._axis_weights(points[:, j], j, i)
            rows.append(w)
        return torch.stack(rows)

    def members(self, points: Tensor) -> Tensor:
        """(K, P) bool: the points inside each expert's widened box."""
        rows = []
        for k in range(self.experts):
            inside = torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
            for j, i in enumerate(self._cells(k)):
                width = (self.hi[j] - self.lo[j]) / self.splits[j]
                pad = self.overlap * width
                start, end = self.lo[j] + i * width, self.lo[j] + (i + 1) * width
                start = start - pad if i > 0 else -math.inf
                end = end + pad if i < self.splits[j] - 1 else math.inf
                inside = inside & (points[:, j] >= start) & (points[:, j] <= end)
            rows.append(inside)
        return torch.stack(rows)

    def owner(self, points: Tensor) -> Tensor:
        """(P,) the expert with the largest share at each point."""
        return self.weights(points).argmax(0)


def _ramp(z: Tensor, edge: float, half: float) -> Tensor:
    """0 below ``edge - half``, 1 above ``edge + half``, smoothstep in between."""
    if half <= 0:
        return (z >= edge).to(z.dtype)
    s = ((z - edge + half) / (2 * half)).clamp(0, 1)
    return s * s * (3 - 2 * s)


def stitch(parts: list[Jet], owner: Tensor) -> Jet:
    """The stitched solution's jet: at each point, the jet of the expert that owns it.

    ``parts[k]`` is expert k's solution jet (B, P, G), ``owner`` (P,) from
    ``Decomposition.owner``. This is PI-HC-MoE's router: every point belongs to one expert,
    and the solution's derivatives there are that expert's (the interfaces between
    experts have measure zero; continuity across them is the continuity penalty's job).
    """
    pick = torch.nn.functional.one_hot(owner, len(parts)).to(parts[0].value.dtype)  # (P, K)

    def select(tensors: list[Tensor]) -> Tensor:
        return (torch.stack(tensors, -1) * pick.unsqueeze(-2)).sum(-1)

    return Jet(*(select([getattr(p, f) for p in parts]) for f in ("value", "d1", "d2")))


def blend(parts: list[Tensor], shares: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The partition-of-unity prediction and the experts' weighted spread around it.

    ``parts[k]`` (B, P) is expert k's prediction at every point (anything where its share
    is 0), ``shares[k]`` (P,) its weight. The spread Σ_k w_k (u_k - u)² is zero exactly
    when overlapping experts agree: the continuity penalty.
    """
    u = sum(w * p for w, p in zip(shares, parts))
    spread = sum(w * (p - u) ** 2 for w, p in zip(shares, parts))
    return u, spread


def relative_l2(prediction: Tensor, reference: Tensor) -> Tensor:
    """Per instance ‖u - u_ref‖ / ‖u_ref‖ over all points (the paper's error measure)."""
    flat_p, flat_r = prediction.flatten(1), reference.flatten(1)
    return (flat_p - flat_r).norm(dim=1) / flat_r.norm(dim=1).clamp_min(1e-12)
