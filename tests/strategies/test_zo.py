"""MeZO / SPSA math (strategies.zo.spsa) and its replica (workers.zo), without Ray."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.config import DataConfig
from orchestrator.data.source import resolve_dataset
from strategies.config import MLPConfig
from strategies.eggroll.lowrank import NoiseSpec, es_gradient, pair_noise
from strategies.zo.spsa import (
    SeededDirection,
    decayed,
    drift_,
    in_place_pair,
    optimised_parameters,
    perturbed,
    projected_gradient,
    projected_gradients,
    spsa_update_,
)
from workers.zo import ZOReplica


def quadratic(dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L(theta) = 1/2 theta^T A theta + b^T theta in float64: (A, b, theta)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    theta = torch.randn(dim, generator=g, dtype=torch.float64)
    return a, b, theta


def loss_of(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> float:
    return float(0.5 * theta @ a @ theta + b @ theta)


def test_the_estimate_is_the_directional_derivative_on_a_quadratic():
    a, b, theta = quadratic()
    gradient = a @ theta + b
    for k in range(5):
        z = SeededDirection(seed=1, update=3, direction=k)
        eps = 1e-3
        (plus,), (minus,) = perturbed([theta], z, eps), perturbed([theta], z, -eps)
        g = projected_gradient(loss_of(a, b, plus), loss_of(a, b, minus), eps)
        # The central difference of a quadratic is exact: only rounding is left.
        assert g == pytest.approx(float(z(0, theta) @ gradient), rel=1e-7, abs=1e-9)


def test_n_spsa_averages_directions_into_the_gradient():
    """Many directions: the mean of g_k z_k approaches the gradient (E[z z^T] = I)."""
    a, b, theta = quadratic(dim=4)
    gradient = a @ theta + b
    directions = [SeededDirection(seed=0, update=0, direction=k) for k in range(4000)]
    eps = 1e-3
    grads = [
        projected_gradient(
            loss_of(a, b, perturbed([theta], z, eps)[0]),
            loss_of(a, b, perturbed([theta], z, -eps)[0]),
            eps,
        )
        for z in directions
    ]
    moved = theta.clone()
    spsa_update_([moved], [True], directions, grads, lr=1.0, weight_decay=0.0)
    estimate = theta - moved
    cosine = float(estimate @ gradient / (estimate.norm() * gradient.norm()))
    assert cosine > 0.97
    assert float(estimate.norm() / gradient.norm()) == pytest.approx(1.0, abs=0.1)


def test_an_n_direction_update_is_the_mean_of_the_single_ones():
    params = [torch.randn(3, 4), torch.randn(4)]
    directions = [SeededDirection(seed=2, update=7, direction=k) for k in range(3)]
    grads = [0.5, -1.25, 2.0]
    lr = 0.1
    expected = [p.clone() for p in params]
    for z, g in zip(directions, grads):
        for i, p in enumerate(expected):
            p -= lr * g * z(i, p) / len(directions)
    moved = [p.clone() for p in params]
    norm = spsa_update_(moved, [True, False], directions, grads, lr, weight_decay=0.0)
    for got, want in zip(moved, expected):
        torch.testing.assert_close(got, want)
    step = torch.cat([(m - p).flatten() for m, p in zip(moved, params)])
    assert norm == pytest.approx(float(step.norm()), rel=1e-5)


def test_the_update_is_eggrolls_mirrored_pair_of_full_rank_noise():
    """Population 2, antithetic, full rank, unshaped fitness -L: EGGROLL's ascent step on
    its ES gradient is the SPSA descent step along the same noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    names = [name for name, _ in optimised_parameters(model)]
    params = [p.detach() for _, p in optimised_parameters(model)]
    spec = NoiseSpec(rank=1, antithetic=True, full_rank=True)
    seed, generation, sigma, lr = 4, 9, 0.01, 0.3

    def noise(index: int, param: torch.Tensor) -> torch.Tensor:
        return pair_noise(seed, generation, 0, index, param.shape, spec)[0].to(param.dtype)

    def loss(moved: list[torch.Tensor]) -> float:
        logits = torch.func.functional_call(model, dict(zip(names, moved)), (x,))
        return float(nn.functional.cross_entropy(logits, y).double())

    plus, minus = loss(perturbed(params, noise, sigma)), loss(perturbed(params, noise, -sigma))
    g = projected_gradient(plus, minus, sigma)
    ours = [p.clone() for p in params]
    spsa_update_(ours, [True] * len(ours), [noise], [g], lr, weight_decay=0.0)
    fitness = torch.tensor([-plus, -minus], dtype=torch.float64)
    ascent = es_gradient(params, fitness, seed, generation, sigma, spec)
    for mine, p, grad in zip(ours, params, ascent):
        torch.testing.assert_close(mine, p + lr * grad, rtol=1e-5, atol=1e-7)


def test_the_same_key_draws_the_same_direction_and_leaves_the_global_rng_alone():
    param = torch.empty(50, 3)
    rng = torch.get_rng_state()
    one = SeededDirection(seed=11, update=5, direction=1)(2, param)
    again = SeededDirection(seed=11, update=5, direction=1)(2, param)
    assert torch.equal(one, again)
    assert torch.equal(torch.get_rng_state(), rng)
    for other in (
        SeededDirection(11, 5, 0)(2, param),  # another direction
        SeededDirection(11, 6, 1)(2, param),  # another update
        SeededDirection(11, 5, 1)(3, param),  # another parameter
        SeededDirection(12, 5, 1)(2, param),  # another run
    ):
        assert not torch.equal(one, other)
    assert one.dtype == torch.float32 and float(one.std()) == pytest.approx(1.0, abs=0.15)


def test_a_perturbed_copy_leaves_the_weights_and_the_round_trip_restores_them():
    params = [torch.randn(64, 32), torch.randn(32)]
    before = [p.clone() for p in params]
    z = SeededDirection(seed=0, update=1, direction=0)
    moved = perturbed(params, z, 1e-3)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    seen = []
    for sign in in_place_pair(params, z, 1e-3):
        seen.append(sign)
        if sign == 1:
            torch.testing.assert_close(params[0], moved[0], rtol=0, atol=1e-6)
    assert seen == [1, -1]
    for p, b in zip(params, before):
        # Not bit-exact (the round trip rounds) but within a few float32 ulps of theta.
        torch.testing.assert_close(p, b, rtol=0, atol=1e-6)


def test_drift_rounds_exactly_as_a_scored_round_trip():
    scored = [torch.randn(40, 20) * 3, torch.randn(20)]
    silent = [p.clone() for p in scored]
    directions = [SeededDirection(seed=3, update=2, direction=k) for k in range(2)]
    for z in directions:
        for _ in in_place_pair(scored, z, 0.1):
            float(scored[0].sum())  # a forward would read the weights here
    drift_(silent, directions, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(scored, silent))


def test_weight_decay_skips_biases_and_norm_layers():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2, bias=False))
    assert decayed(model) == {
        "0.weight": True,
        "0.bias": False,
        "1.weight": False,
        "1.bias": False,
        "2.weight": True,
    }
    params = [p.detach().clone() for _, p in optimised_parameters(model)]
    decays = list(decayed(model).values())
    moved = [p.clone() for p in params]
    zero = SeededDirection(seed=0, update=0, direction=0)
    spsa_update_(moved, decays, [zero], [0.0], lr=0.1, weight_decay=0.5)
    for p, m, decay in zip(params, moved, decays):
        torch.testing.assert_close(m, p * (1 - 0.05) if decay else p)


def test_a_non_finite_side_drops_its_direction_and_none_left_is_no_update():
    grads = projected_gradients(np.array([1.0, np.nan, 2.0]), np.array([0.5, 1.0, np.inf]), 0.5)
    assert grads == {0: pytest.approx(0.5)}
    params = [torch.ones(3)]
    assert spsa_update_(params, [True], [], [], lr=1.0, weight_decay=1.0) == 0.0
    assert torch.equal(params[0], torch.ones(3))


@pytest.fixture(scope="module")
def digits(dataset_root):
    return resolve_dataset(DataConfig(dataset="digits", root=str(dataset_root)))


def replica(digits, **options) -> ZOReplica:
    settings = {
        "model": MLPConfig(hidden=[16], norm="layernorm"),
        "dataset": digits,
        "batch_size": 32,
        "seed": 0,
        "directions": 2,
        "weight_decay": 0.01,
        "in_place": False,
        **options,
    }
    return ZOReplica(**settings)


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in_place"])
def test_replicas_scoring_slices_agree_with_one_scoring_the_batch(digits, in_place):
    """Two workers' summed slices are one worker's whole batch; all replicas, and a
    reference that only drifts and updates, stay bit-identical."""
    whole, left, right = (replica(digits, in_place=in_place) for _ in range(3))
    reference = replica(digits, in_place=in_place)
    for t in range(3):
        sums, count = whole.losses(t, 0, 32, 1e-2)
        a, count_a = left.losses(t, 0, 13, 1e-2)
        b, count_b = right.losses(t, 13, 32, 1e-2)
        assert count == count_a + count_b == 32
        np.testing.assert_allclose((a + b) / 32, sums / 32, rtol=1e-5)
        mean = sums / count
        grads = projected_gradients(mean[:, 0], mean[:, 1], 1e-2)
        for each in (whole, left, right):
            each.update(t, grads, lr=0.05)
        if in_place:
            reference.drift(t, 1e-2)
        reference.update(t, grads, lr=0.05)
    checksums = {r.checksum() for r in (whole, left, right, reference)}
    assert len(checksums) == 1
    assert checksums != {replica(digits).checksum()}  # it did move


def test_the_copy_and_in_place_modes_score_the_same_losses(digits):
    copy_mode, in_place = replica(digits), replica(digits, in_place=True)
    sums, _ = copy_mode.losses(0, 0, 32, 1e-2)
    again, _ = in_place.losses(0, 0, 32, 1e-2)
    np.testing.assert_allclose(sums, again, rtol=1e-5)
    assert sums[0, 0] != sums[0, 1]  # the two sides differ


def test_a_replica_restores_from_anothers_state(digits):
    moved, fresh = replica(digits), replica(digits, seed=1)
    moved.update(0, {0: 1.0, 1: -2.0}, lr=0.1)
    fresh.load(copy.deepcopy(moved.state()))
    assert fresh.checksum() == moved.checksum()
