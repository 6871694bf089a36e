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
    ESLayerNorm,
    ESLinear,
    NoiseSpec,
    centered_ranks,
    es_gradient,
    es_parameters,
    member_noise,
    noise_keys,
    noise_table,
    pair_noise,
    pairs_noise,
    population,
    scheduled,
    shape_fitness,
    zscore,
)
from strategies.replicas import parameter_checksum


def test_noise_key_depends_on_every_part_of_the_key():
    def key(seed, generation, pair, param):
        return int(noise_keys(seed, generation, [pair], param)[0])

    base = key(1, 2, 3, 4)
    others = {key(0, 2, 3, 4), key(1, 0, 3, 4), key(1, 2, 0, 4), key(1, 2, 3, 0)}
    assert base not in others and len(others) == 4


def test_a_pairs_noise_does_not_depend_on_the_pairs_drawn_with_it():
    shape, spec = torch.Size([6, 5]), NoiseSpec(rank=2)
    together = pairs_noise(4, 1, [9, 2, 9, 5], 3, shape, spec)
    for row, pair in enumerate([9, 2, 9, 5]):
        alone = torch.cat([t.flatten() for t in pair_noise(4, 1, pair, 3, shape, spec)])
        assert torch.equal(together[row].flatten(), alone)
    assert not torch.equal(together[1], together[3])


def test_a_pairs_noise_is_a_window_of_the_shared_table():
    draw = pairs_noise(0, 7, [3], 1, torch.Size([4]), NoiseSpec()).flatten()
    table = noise_table()
    offset = table.unfold(0, 4, 1).eq(draw).all(dim=1).nonzero().flatten()
    assert offset.numel() == 1 and torch.equal(table[offset[0] : offset[0] + 4], draw)


def test_dense_noise_larger_than_half_the_table_is_refused_with_the_fix():
    side = int((noise_table().numel() // 2) ** 0.5) + 1
    with pytest.raises(ValueError, match="full_rank: false"):
        pairs_noise(0, 0, [0], 0, torch.Size([side, side]), NoiseSpec(full_rank=True))


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


def _explicit_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    return torch.stack(
        [torch.nn.functional.linear(x[i], w[i], None if b is None else b[i]) for i in range(len(w))]
    )


@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize(("rank", "full_rank"), [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("last_bias", [True, False])
def test_population_forward_equals_each_member_with_its_own_weights(
    rank, full_rank, shared_input, last_bias
):
    torch.manual_seed(0)
    model = nn.Sequential(ESLinear(5, 7), nn.Tanh(), ESLinear(7, 3, bias=last_bias))
    spec = NoiseSpec(rank=rank, full_rank=full_rank)
    params = es_parameters(model)
    members = [3, 4, 9]
    noise = member_noise(params, members, seed=2, generation=1, sigma=0.2, spec=spec)
    # A shared input (expand, stride 0) takes the one-GEMM path; distinct rows the other.
    x = torch.randn(4, 5).expand(3, 4, 5) if shared_input else torch.randn(3, 4, 5)
    with population(model, noise):
        batched = model(x)
    perturbed = {id(p): p.detach() + n.dense() for p, n in zip(params, noise)}
    first, last = model[0], model[2]
    h = torch.tanh(_explicit_linear(x, perturbed[id(first.weight)], perturbed[id(first.bias)]))
    last_b = perturbed[id(last.bias)] if last_bias else None
    expected = _explicit_linear(h, perturbed[id(last.weight)], last_b)
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


def test_population_layer_norm_gives_each_member_its_own_gain_and_bias():
    torch.manual_seed(0)
    norm = ESLayerNorm(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    noise = member_noise(es_parameters(norm), [0, 1, 4], 0, 2, 0.3, NoiseSpec(rank=1))
    x = torch.randn(3, 2, 5, 6)
    with population(norm, noise):
        out = norm(x)
    bias, weight = (p.detach() + n.dense() for p, n in zip(es_parameters(norm), noise))
    expected = torch.stack(
        [nn.functional.layer_norm(x[i], (6,), weight[i], bias[i]) for i in range(3)]
    )
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out[0], out[2])  # the members differ, so the test has teeth
    assert torch.equal(norm(x), nn.functional.layer_norm(x, (6,), norm.weight, norm.bias))


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
