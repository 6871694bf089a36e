"""EGGROLL math without Ray: noise, the batched forward, the update, shaping, schedules."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from strategies.eggroll.lowrank import (
    ESEmbedding,
    ESInt8Linear,
    ESLinear,
    NoiseSpec,
    centered_ranks,
    es_gradient,
    es_parameters,
    member_noise,
    noise_seed,
    pair_noise,
    parameter_checksum,
    population,
    scheduled,
    shape_fitness,
    zscore,
)


def test_noise_seed_depends_on_every_part_of_the_key():
    base = noise_seed(1, 2, 3, 4)
    others = {
        noise_seed(0, 2, 3, 4),
        noise_seed(1, 0, 3, 4),
        noise_seed(1, 2, 0, 4),
        noise_seed(1, 2, 3, 0),
    }
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63


def test_mirrored_members_share_noise_with_opposite_signs():
    w = torch.zeros(5, 3)
    a0, a1 = member_noise([w], [0, 1], seed=7, generation=0, sigma=0.5, spec=NoiseSpec(2))[
        0
    ].dense()
    assert torch.allclose(a0, -a1)
    plain = member_noise([w], [0, 1], 7, 0, 0.5, NoiseSpec(2, antithetic=False))[0].dense()
    assert not torch.allclose(plain[0], -plain[1])


def test_low_rank_noise_has_unit_variance_entries_at_any_rank():
    for rank in (1, 4):
        noise = member_noise([torch.zeros(64, 64)], range(0, 400, 2), 0, 0, 1.0, NoiseSpec(rank))
        assert noise[0].dense().var().item() == pytest.approx(1.0, rel=0.08)


def test_noise_is_bit_identical_in_another_process():
    here = torch.cat(
        [t.flatten() for t in pair_noise(3, 5, 11, 2, torch.Size([7, 4]), NoiseSpec(3))]
    )
    code = (
        "import torch, sys; from strategies.eggroll.lowrank import pair_noise, NoiseSpec;"
        "t = pair_noise(3, 5, 11, 2, torch.Size([7, 4]), NoiseSpec(3));"
        "sys.stdout.write(torch.cat([x.flatten() for x in t]).double().numpy().tobytes().hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert bytes.fromhex(out.stdout) == here.double().numpy().tobytes()


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("full_rank", [False, True])
def test_gradient_equals_the_explicit_sum_of_member_perturbations(antithetic, full_rank):
    torch.manual_seed(0)
    spec = NoiseSpec(rank=3, antithetic=antithetic, full_rank=full_rank)
    params = [torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)]
    fitness = torch.randn(10, dtype=torch.float64)
    sigma = 0.3
    grads = es_gradient(params, fitness, seed=1, generation=4, sigma=sigma, spec=spec)
    noise = member_noise(params, range(10), 1, 4, sigma, spec)
    for grad, param_noise in zip(grads, noise, strict=True):
        # member_noise folds sigma in: E_i = noise_i / sigma.
        explicit = sum(f * e for f, e in zip(fitness, param_noise.dense() / sigma)) / (10 * sigma)
        assert torch.allclose(grad, explicit, atol=1e-10)


def test_gradient_points_uphill_on_a_quadratic():
    target = torch.randn(8, 6, dtype=torch.float64)
    w = torch.zeros(8, 6, dtype=torch.float64)
    spec = NoiseSpec(rank=2)
    noise = member_noise([w], range(2000), 0, 0, 0.1, spec)[0].dense()
    fitness = -((w + noise - target) ** 2).sum(dim=(1, 2))
    grad = es_gradient([w], fitness, 0, 0, 0.1, spec)[0]
    true_grad = 2 * (target - w)
    cosine = (grad * true_grad).sum() / (grad.norm() * true_grad.norm())
    assert cosine > 0.5


def _explicit_linear(layer: ESLinear, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    return torch.stack([torch.nn.functional.linear(x[i], w[i], b[i]) for i in range(len(w))])


@pytest.mark.parametrize("full_rank", [False, True])
def test_population_forward_equals_each_member_with_its_own_weights(full_rank):
    torch.manual_seed(0)
    model = nn.Sequential(ESLinear(5, 7), nn.Tanh(), ESLinear(7, 3))
    spec = NoiseSpec(rank=2, full_rank=full_rank)
    params = es_parameters(model)
    members = [3, 4, 9]
    noise = member_noise(params, members, seed=2, generation=1, sigma=0.2, spec=spec)
    x = torch.randn(3, 4, 5)
    with population(model, noise):
        batched = model(x)
    perturbed = {id(p): p.detach() + n.dense() for p, n in zip(params, noise)}
    first, last = model[0], model[2]
    h = torch.tanh(
        _explicit_linear(first, x, perturbed[id(first.weight)], perturbed[id(first.bias)])
    )
    expected = _explicit_linear(last, h, perturbed[id(last.weight)], perturbed[id(last.bias)])
    assert torch.allclose(batched, expected, atol=1e-5)
    assert torch.equal(model(x[0]), model[2](torch.tanh(model[0](x[0]))))  # outside: plain


def test_population_embedding_equals_explicit_rows():
    torch.manual_seed(0)
    emb = ESEmbedding(11, 4)
    noise = member_noise(es_parameters(emb), [0, 1, 5], 0, 0, 0.3, NoiseSpec(rank=2))
    tokens = torch.randint(0, 11, (3, 6))
    with population(emb, noise):
        out = emb(tokens)
    tables = emb.weight.detach() + noise[0].dense()
    expected = torch.stack([tables[i][tokens[i]] for i in range(3)])
    assert torch.allclose(out, expected, atol=1e-6)


def test_int8_linear_uses_weights_on_the_int8_grid():
    torch.manual_seed(0)
    layer = ESInt8Linear(16, 8)
    w = layer.effective_weight()
    scale = layer.weight.abs().amax(dim=1, keepdim=True) / 127
    levels = w / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 127
    assert (w - layer.weight).abs().max() <= scale.max() / 2 + 1e-7


def test_centered_ranks_and_zscore():
    f = torch.tensor([3.0, -10.0, 100.0, 0.0])
    assert centered_ranks(f).tolist() == pytest.approx([1 / 6, -0.5, 0.5, -1 / 6])
    z = zscore(f)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert z.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    assert shape_fitness(f, "none").tolist() == f.tolist()


def test_schedules_go_from_initial_to_final():
    assert scheduled(1.0, 0.1, "constant", 5, 10) == 1.0
    assert scheduled(1.0, 0.1, "linear", 0, 11) == 1.0
    assert scheduled(1.0, 0.1, "linear", 10, 11) == pytest.approx(0.1)
    assert scheduled(1.0, 0.01, "exponential", 5, 11) == pytest.approx(0.1)


def test_checksum_sees_a_single_changed_bit():
    params = [torch.zeros(4, 4), torch.ones(3)]
    before = parameter_checksum(params)
    params[0][1, 2] = 1e-30
    assert parameter_checksum(params) != before


def test_tied_fitnesses_share_their_rank_so_a_flat_landscape_gives_no_update():
    ranks = centered_ranks(torch.tensor([1.0, 5.0, 1.0, 3.0]))
    assert ranks.tolist() == pytest.approx([-1 / 3, 0.5, -1 / 3, 1 / 6])
    flat = centered_ranks(torch.full((8,), 500.0))
    assert torch.equal(flat, torch.zeros(8, dtype=torch.float64))
    grads = es_gradient([torch.zeros(4, 3)], flat, 0, 0, 0.1, NoiseSpec(rank=1))
    assert torch.count_nonzero(grads[0]) == 0
