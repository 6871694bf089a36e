"""The local-learning math, without Ray: aux-net construction and gradient isolation."""

from __future__ import annotations

import pytest
import torch

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig, OptimizerConfig
from strategies.models.network import build_network
from strategies.models.units import unit_shapes
from strategies.pipeline.local_learning import (
    BlockSpec,
    auglocal_depths,
    auglocal_layer_choice,
    build_aux_head,
    build_block,
    plan_blocks,
)

MODEL = ModelConfig(hidden=[32, 32, 32, 32, 32, 32, 32, 32])


def table(features: int, classes: int) -> InputSpec:
    return InputSpec("table", (features,), classes)


def test_depths_fall_linearly_from_max_to_one():
    assert auglocal_depths(4, 3) == [3, 2, 2, 1]
    assert auglocal_depths(5, 5) == [5, 4, 3, 2, 1]
    assert auglocal_depths(1, 3) == [3]
    assert auglocal_depths(0, 3) == []


def test_layer_choice_is_uniform_and_ends_at_the_deepest_layer():
    assert auglocal_layer_choice(last_layer=1, num_layers=8, depth=3) == [3, 5, 7]
    assert auglocal_layer_choice(last_layer=0, num_layers=8, depth=1) == [7]
    assert auglocal_layer_choice(last_layer=3, num_layers=8, depth=2) == [5, 7]


def test_layer_choice_takes_every_following_layer_when_depth_exceeds_them():
    assert auglocal_layer_choice(last_layer=5, num_layers=8, depth=3) == [6, 7]
    with pytest.raises(ValueError, match="no layers after it"):
        auglocal_layer_choice(last_layer=7, num_layers=8, depth=1)


def test_plan_covers_every_layer_once_in_order():
    plans = plan_blocks(MODEL, table(16, 10), blocks=3, aux_head="augmented", aux_depth=3)
    layers = [i for p in plans for i in p.units]
    assert layers == list(range(8))
    assert [p.is_last for p in plans] == [False, False, True]
    assert plans[-1].aux_units == ()


def test_plan_aux_nets_follow_the_auglocal_schedule():
    plans = plan_blocks(MODEL, table(16, 10), blocks=4, aux_head="augmented", aux_depth=3)
    depths = [len(p.aux_units) for p in plans[:-1]]
    expected = auglocal_depths(3, 3)
    for plan, depth, want in zip(plans, depths, expected):
        following = 8 - 1 - plan.units[-1]
        assert depth == min(want, following)
        assert plan.aux_units[-1] == 7
        assert all(layer > plan.units[-1] for layer in plan.aux_units)


def test_plan_balances_equal_layers_with_linear_heads():
    model = ModelConfig(hidden=[64, 64, 64, 64])
    plans = plan_blocks(model, table(64, 10), blocks=2, aux_head="linear", aux_depth=1)
    assert [p.units for p in plans] == [(0, 1), (2, 3)]


def test_plan_gives_an_augmented_first_block_fewer_layers():
    model = ModelConfig(hidden=[64] * 6)
    plans = plan_blocks(model, table(64, 10), blocks=2, aux_head="augmented", aux_depth=2)
    assert len(plans[0].units) < len(plans[1].units)


def test_plan_rejects_more_blocks_than_layers():
    with pytest.raises(ConfigError, match="5 blocks but the mlp model has 4 units"):
        plan_blocks(ModelConfig(hidden=[8, 8, 8, 8]), table(4, 3), 5, "linear", 1)


def test_augmented_head_copies_the_shapes_of_the_chosen_layers():
    model = ModelConfig(hidden=[16, 24, 32, 40, 48])
    plans = plan_blocks(model, table(8, 5), blocks=2, aux_head="augmented", aux_depth=2)
    shapes = unit_shapes(build_network(model, table(8, 5), seed=0), table(8, 5))
    last = plans[0].units[-1]
    head = build_aux_head(model, table(8, 5), plans[0].aux_units, shapes[last], shapes)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == len(plans[0].aux_units) + 1
    widths = [8, *model.hidden]
    assert linears[0].in_features == widths[plans[0].units[-1] + 1]
    for linear, layer in zip(linears, plans[0].aux_units):
        assert linear.out_features == widths[layer + 1]
    assert linears[-1].out_features == 5


def test_linear_head_is_a_single_classifier():
    plans = plan_blocks(MODEL, table(16, 10), blocks=2, aux_head="linear", aux_depth=3)
    shapes = unit_shapes(build_network(MODEL, table(16, 10), seed=0), table(16, 10))
    head = build_aux_head(MODEL, table(16, 10), (), shapes[plans[0].units[-1]], shapes)
    assert [type(m).__name__ for m in head] == ["Linear"]


def _blocks(aux_head: str = "augmented") -> list:
    model = ModelConfig(hidden=[16, 16, 16])
    plans = plan_blocks(model, table(8, 4), blocks=3, aux_head=aux_head, aux_depth=2)
    return [
        build_block(
            BlockSpec(p, model, table(8, 4), seed=3, optimizer=OptimizerConfig(lr=0.01), lr=0.01)
        )
        for p in plans
    ]


def test_local_loss_of_a_block_sends_no_gradient_to_the_block_before():
    torch.manual_seed(0)
    first, second, _ = _blocks()
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    hidden, _ = first.train_step(x, y)
    assert not hidden.requires_grad and hidden.grad_fn is None
    grads = [p.grad.clone() for p in first.parameters()]
    weights = [p.detach().clone() for p in first.parameters()]
    second.train_step(hidden, y)
    for grad, p in zip(grads, first.parameters()):
        assert torch.equal(grad, p.grad)
    for weight, p in zip(weights, first.parameters()):
        assert torch.equal(weight, p)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in second.parameters())


def test_blocks_start_from_the_same_weights_as_the_whole_network():
    blocks = _blocks()
    network = build_network(ModelConfig(hidden=[16, 16, 16]), table(8, 4), seed=3)
    body_weights = [p for b in blocks for p in b.body.parameters()]
    net_hidden = [p for layer in list(network)[:-1] for p in layer.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(body_weights, net_hidden))
    assert all(
        torch.equal(a, b) for a, b in zip(blocks[-1].head.parameters(), network[-1].parameters())
    )


def test_block_state_round_trip_restores_training_exactly():
    torch.manual_seed(1)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    a, b = _blocks()[0], _blocks()[0]
    a.train_step(x, y)
    b.restore(a.state())
    out_a, stats_a = a.train_step(x, y)
    out_b, stats_b = b.train_step(x, y)
    assert torch.equal(out_a, out_b) and stats_a == stats_b


def test_local_training_learns_a_separable_task():
    torch.manual_seed(0)
    blocks = _blocks("linear")
    centers = torch.randn(4, 8) * 3
    for _ in range(150):
        y = torch.randint(0, 4, (64,))
        h = centers[y] + torch.randn(64, 8)
        for block in blocks:
            h, stats = block.train_step(h, y)
    assert stats.correct / stats.count > 0.9
