"""The model families without Ray: shapes, costs, cuts, local heads, losses and errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml
from torch import nn

from orchestrator.config import validate_mapping
from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import MLPConfig, ModelConfig, OptimizerConfig, ResNetConfig
from strategies.models.heads import linear_head
from strategies.models.loss import task_loss
from strategies.models.network import build_network
from strategies.models.resnet import BasicBlock
from strategies.models.transformer import TransformerBlock
from strategies.models.units import forward_flops, profile_network, unit_shapes
from strategies.pipeline.local_learning import (
    BlockSpec,
    LocalBlock,
    auglocal_depths,
    build_aux_head,
    build_block,
    plan_blocks,
)

IMAGES = InputSpec("image", (3, 16, 16), 10)
TOKENS = InputSpec("tokens", (12,), 20)
TABLE = InputSpec("table", (8,), 4)
RESNET = ModelConfig(kind="resnet", depth=20, width=4)
TRANSFORMER = ModelConfig(kind="transformer", d_model=16, layers=4, heads=2)


_DATA_FOR = {"resnet": "digits-images", "transformer": "grammar"}


def run_config(model: dict, blocks: int = 2) -> dict:
    """A pipeline run of ``model`` on a built-in data set the family reads."""
    return {
        "strategy": {"kind": "pipeline", "blocks": blocks},
        "model": model,
        "data": {"dataset": _DATA_FOR.get(model.get("kind", "mlp"), "digits")},
    }


def small_mlp(spec: InputSpec) -> list[nn.Module]:
    """A custom network: two units on flattened input, then the output layer."""
    features = 1
    for size in spec.shape:
        features *= size
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        nn.Linear(16, spec.num_classes),
    ]


# --- configs -------------------------------------------------------------------------


def test_a_model_section_without_kind_is_the_mlp_and_each_kind_its_family():
    assert isinstance(ModelConfig(), MLPConfig)
    assert isinstance(validate_mapping(run_config({"hidden": [8, 8]})).model, MLPConfig)
    assert isinstance(validate_mapping(run_config({"kind": "resnet"})).model, ResNetConfig)


@pytest.mark.parametrize(("depth", "units"), [(20, 9), (32, 15), (44, 21), (56, 27), (110, 54)])
def test_resnet_depths_are_the_papers_with_six_n_plus_two_layers(depth, units):
    assert ModelConfig(kind="resnet", depth=depth).num_units() == units


def test_resnet_takes_blocks_per_stage_instead_of_depth_and_refuses_a_bad_depth():
    assert ModelConfig(kind="resnet", blocks_per_stage=2, stages=2).num_units() == 4
    assert ModelConfig(kind="resnet").num_units() == 9  # ResNet-20
    with pytest.raises(ConfigError, match="depth must be 2 \\* stages \\* n \\+ 2"):
        validate_mapping(run_config({"kind": "resnet", "depth": 21}))
    with pytest.raises(ConfigError, match="not both"):
        validate_mapping(run_config({"kind": "resnet", "depth": 20, "blocks_per_stage": 3}))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"hidden": [8, 8]}, "3 blocks but model.hidden has 2 layers; allowed: 1..2"),
        (
            {"kind": "resnet", "depth": 6, "stages": 2},
            "3 blocks but model.depth has 2 residual blocks; allowed: 1..2",
        ),
        (
            {"kind": "resnet", "blocks_per_stage": 1, "stages": 2},
            "3 blocks but model.stages x model.blocks_per_stage has 2 residual blocks; "
            "allowed: 1..2",
        ),
        (
            {"kind": "transformer", "layers": 2},
            "3 blocks but model.layers has 2 transformer blocks; allowed: 1..2",
        ),
    ],
)
def test_more_blocks_than_units_is_refused_at_config_time_naming_the_family(model, message):
    with pytest.raises(ConfigError, match=message.replace(".", "\\.")):
        validate_mapping(run_config(model, blocks=3))


def test_a_custom_model_is_counted_when_built_not_at_config_time():
    config = validate_mapping(run_config({"kind": "custom", "module": "a.b:c"}, blocks=9))
    assert config.model.num_units() is None


def test_tied_embeddings_are_refused_in_a_pipeline_of_several_blocks():
    tied = {"kind": "transformer", "layers": 2, "tie_embeddings": True}
    with pytest.raises(ConfigError, match="cannot share a weight"):
        validate_mapping(run_config(tied, blocks=2))
    assert validate_mapping(run_config(tied, blocks=1)).model.tie_embeddings


def test_a_config_with_a_callable_dumps_to_json_and_yaml():
    config = validate_mapping(run_config({"kind": "custom", "module": small_mlp}))
    assert config.model.module is small_mlp
    dumped = config.model_dump(mode="json")
    assert dumped["model"]["module"] == f"{__name__}:small_mlp"
    assert yaml.safe_load(yaml.safe_dump(dumped)) == json.loads(json.dumps(dumped))
    again = validate_mapping(dumped)
    assert again.model.module == dumped["model"]["module"]
    assert build_network(again.model, IMAGES, seed=0)(torch.randn(2, *IMAGES.shape)).shape == (
        2,
        10,
    )


# --- building, shapes and costs --------------------------------------------------------


def test_resnet_units_are_residual_blocks_halving_resolution_per_stage():
    network = build_network(RESNET, IMAGES, seed=0)
    assert len(network) == 9 + 1
    assert isinstance(network[0], nn.Sequential) and isinstance(network[0][1], BasicBlock)
    assert unit_shapes(network, IMAGES) == [(4, 16, 16)] * 3 + [(8, 8, 8)] * 3 + [(16, 4, 4)] * 3
    assert network(torch.randn(2, *IMAGES.shape)).shape == (2, 10)


def test_resnet_takes_any_image_size_and_channel_count():
    spec = InputSpec("image", (1, 9, 7), 3)
    network = build_network(ModelConfig(kind="resnet", depth=8, width=2), spec, seed=0)
    assert unit_shapes(network, spec) == [(2, 9, 7), (4, 5, 4), (8, 3, 2)]


def test_zero_pad_shortcut_has_no_weights():
    projection = build_network(RESNET, IMAGES, seed=0)
    zero_pad = build_network(RESNET.model_copy(update={"shortcut": "zero_pad"}), IMAGES, seed=0)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(zero_pad) == count(projection) - (4 * 8 + 2 * 8 + 8 * 16 + 2 * 16)
    assert unit_shapes(zero_pad, IMAGES) == unit_shapes(projection, IMAGES)


def test_transformer_units_are_blocks_over_the_context_and_the_head_scores_the_vocabulary():
    network = build_network(TRANSFORMER, TOKENS, seed=0)
    assert len(network) == 4 + 1 and isinstance(network[2], TransformerBlock)
    assert unit_shapes(network, TOKENS) == [(12, 16)] * 4
    assert network(torch.zeros(3, 12, dtype=torch.long)).shape == (3, 12, 20)


def test_transformer_is_causal():
    network = build_network(TRANSFORMER, TOKENS, seed=0).eval()
    ids = torch.randint(0, 20, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 20
    assert torch.allclose(network(ids)[0, :7], network(changed)[0, :7], atol=1e-6)
    assert not torch.allclose(network(ids)[0, 7:], network(changed)[0, 7:])


def test_tied_embeddings_share_one_parameter():
    tied = build_network(TRANSFORMER.model_copy(update={"tie_embeddings": True}), TOKENS, 0)
    assert tied[-1][1].weight is tied[0][0].tokens.weight
    untied = build_network(TRANSFORMER, TOKENS, seed=0)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(untied) - count(tied) == 20 * 16


def test_a_network_is_the_same_from_the_same_seed_and_leaves_the_process_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_network(RESNET, IMAGES, seed=5), build_network(RESNET, IMAGES, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_network(RESNET, IMAGES, seed=6)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ({"kind": "resnet", "depth": 8}, {"dataset": "grammar"}, "'resnet' takes image data"),
        ({"kind": "transformer"}, {"dataset": "digits"}, "'transformer' takes tokens data"),
        ({"hidden": [8]}, {"path": "a.parquet", "image": {"shape": [1, 8, 8]}}, "'mlp' takes"),
        ({"kind": "resnet", "depth": 8}, {"path": "corpus.txt"}, "gives tokens examples"),
    ],
)
@pytest.mark.parametrize("strategy", ["pipeline", "backprop"])
def test_a_family_that_cannot_read_the_data_is_refused_at_config_time(
    model, data, message, strategy
):
    raw = {"strategy": {"kind": strategy}, "model": model, "data": data}
    with pytest.raises(ConfigError, match=message):
        validate_mapping(raw)


def test_a_family_refuses_data_it_cannot_read_naming_the_fix():
    with pytest.raises(ConfigError, match="'transformer' takes tokens data.*model.kind: resnet"):
        build_network(TRANSFORMER, IMAGES, seed=0)
    with pytest.raises(ConfigError, match="'resnet' takes image data.*model.kind: mlp"):
        build_network(RESNET, TABLE, seed=0)
    with pytest.raises(ConfigError, match="'mlp' takes table data.*model.kind: transformer"):
        build_network(ModelConfig(), TOKENS, seed=0)


def test_costs_are_measured_forward_flops_per_example():
    mlp = MLPConfig(hidden=[16, 32])
    profile = profile_network(build_network(mlp, TABLE, seed=0), TABLE)
    assert [p.flops for p in profile] == [2 * 8 * 16, 2 * 16 * 32, 2 * 32 * 4]
    block = BasicBlock(4, 4)
    assert forward_flops(block, (4, 8, 8)) == 2 * (2 * 9 * 4 * 4 * 8 * 8)
    attention_and_mlp = profile_network(build_network(TRANSFORMER, TOKENS, 0), TOKENS)[1].flops
    t, d = 12, 16
    assert attention_and_mlp == 2 * t * d * (3 * d + d + 8 * d) + 2 * 2 * t * t * d


def test_a_unit_that_cannot_take_the_previous_output_is_named_with_its_shape():
    def broken(spec: InputSpec) -> list[nn.Module]:
        return [nn.Linear(8, 16), nn.Linear(12, 4), nn.Linear(4, spec.num_classes)]

    network = build_network(ModelConfig(kind="custom", module=broken), TABLE, seed=0)
    with pytest.raises(ConfigError, match=r"unit 1 \(Linear\) cannot take input of shape \(16,\)"):
        unit_shapes(network, TABLE)


def test_an_output_layer_of_the_wrong_shape_is_refused():
    def wrong(spec: InputSpec) -> list[nn.Module]:
        return [nn.Linear(8, 16), nn.Linear(16, 3)]

    network = build_network(ModelConfig(kind="custom", module=wrong), TABLE, seed=0)
    with pytest.raises(ConfigError, match=r"output layer \(Linear\) gives \(3,\).*wants \(4,\)"):
        profile_network(network, TABLE)


# --- custom modules ------------------------------------------------------------------


def test_a_custom_module_from_a_package_by_its_import_path(tmp_path, monkeypatch):
    package = tmp_path / "my_nets_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def conv(spec):
                channels = spec.shape[0]
                return nn.Sequential(
                    nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU()),
                    nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()),
                    nn.Sequential(
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, spec.num_classes)
                    ),
                )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = ModelConfig(kind="custom", module="my_nets_pkg:conv")
    network = build_network(model, IMAGES, seed=0)
    assert unit_shapes(network, IMAGES) == [(8, 16, 16), (8, 8, 8)]
    plans = plan_blocks(model, IMAGES, blocks=2, aux_head="augmented", aux_depth=1)
    assert [p.units for p in plans] == [(0,), (1,)] and plans[0].aux_units == (1,)


def test_a_custom_module_as_a_callable():
    model = ModelConfig(kind="custom", module=small_mlp)
    network = build_network(model, IMAGES, seed=0)
    assert unit_shapes(network, IMAGES) == [(16,), (16,)]
    assert network(torch.randn(2, *IMAGES.shape)).shape == (2, 10)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("no_such_package_xyz.nets:f", "cannot import 'no_such_package_xyz.nets'"),
        ("json:no_such_function", "'json' has no 'no_such_function'"),
        ("json:__doc__", "'__doc__' is a str"),
        (lambda spec: nn.Linear(8, 4), "returned a Linear; return an nn.Sequential or a list"),
        (lambda spec: [nn.Linear(8, 4)], "returned 1 module\\(s\\); return at least two"),
        (lambda spec: [nn.Linear(8, 4), "relu"], "not nn.Module \\(1: str\\)"),
    ],
)
def test_a_bad_custom_module_says_what_is_wrong(module, message):
    with pytest.raises(ConfigError, match=message):
        build_network(ModelConfig(kind="custom", module=module), TABLE, seed=0)


def test_a_custom_aux_net_whose_units_cannot_take_the_shape_suggests_linear_heads():
    def narrowing(spec: InputSpec) -> list[nn.Module]:
        return [nn.Linear(8, 16), nn.Linear(16, 24), nn.Linear(24, 32), nn.Linear(32, 4)]

    model = ModelConfig(kind="custom", module=narrowing)
    with pytest.raises(ConfigError, match="set strategy.aux_head: linear"):
        plan_blocks(model, TABLE, blocks=2, aux_head="augmented", aux_depth=1)
    assert len(plan_blocks(model, TABLE, blocks=2, aux_head="linear", aux_depth=1)) == 2


# --- cuts and heads --------------------------------------------------------------------


def test_equal_units_with_linear_heads_are_cut_evenly_for_every_family():
    resnet = plan_blocks(RESNET, IMAGES, blocks=3, aux_head="linear", aux_depth=1)
    assert [p.units for p in resnet] == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    transformer = plan_blocks(TRANSFORMER, TOKENS, blocks=2, aux_head="linear", aux_depth=1)
    assert [p.units for p in transformer] == [(0, 1), (2, 3)]


def test_an_impossible_cut_names_the_units_and_their_shapes():
    with pytest.raises(ConfigError, match=r"10 blocks but the resnet model has 9 units \(0: "):
        plan_blocks(RESNET, IMAGES, blocks=10, aux_head="linear", aux_depth=1)
    with pytest.raises(ConfigError, match=r"8: BasicBlock -> \(16, 4, 4\)"):
        plan_blocks(RESNET, IMAGES, blocks=10, aux_head="linear", aux_depth=1)


def test_linear_heads_read_every_shape():
    assert [type(m) for m in linear_head((16,), TABLE)] == [nn.Linear]
    pooled = linear_head((8, 4, 4), IMAGES)
    assert [type(m) for m in pooled] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    assert pooled(torch.randn(2, 8, 4, 4)).shape == (2, 10)
    stream = linear_head((12, 16), TOKENS)
    assert [type(m) for m in stream] == [nn.LayerNorm, nn.Linear]
    assert stream(torch.randn(2, 12, 16)).shape == (2, 12, 20)
    with pytest.raises(ConfigError, match="no local head reads a block output of shape"):
        linear_head((12, 16), IMAGES)


def _plans_and_heads(model: ModelConfig, spec: InputSpec, blocks: int, aux_depth: int) -> list:
    plans = plan_blocks(model, spec, blocks=blocks, aux_head="augmented", aux_depth=aux_depth)
    shapes = unit_shapes(build_network(model, spec, seed=0), spec)
    heads = [
        build_aux_head(model, spec, p.aux_units, shapes[p.units[-1]], shapes) for p in plans[:-1]
    ]
    return plans, heads


def test_auglocal_conv_aux_nets_copy_uniformly_chosen_blocks_as_the_reference_code():
    # ResNet-32 (5 blocks per stage), 4 blocks, aux depth 3: AugLocal's pyramid gives the
    # three local blocks depths 3, 2, 1; each copies blocks spread evenly to the last one.
    model = ModelConfig(kind="resnet", depth=32, width=4)
    plans, heads = _plans_and_heads(model, IMAGES, blocks=4, aux_depth=3)
    assert auglocal_depths(3, 3) == [3, 2, 1]
    for plan, depth, head in zip(plans, [3, 2, 1], heads):
        last = plan.units[-1]
        assert len(plan.aux_units) == min(depth, 14 - last)
        assert plan.aux_units[-1] == 14
        blocks = [m for m in head if isinstance(m, BasicBlock)]
        assert len(blocks) == len(plan.aux_units)
        # Widths are the copied blocks' own; the aux net ends at the network's last stage.
        assert blocks[-1].conv2.out_channels == 16
        assert isinstance(head[-1], nn.Linear) and head[-1].out_features == 10
        assert isinstance(head[len(blocks)], nn.AdaptiveAvgPool2d)
        # Batch norm on the pooled features for depth-1 aux nets, as the reference does.
        assert any(isinstance(m, nn.BatchNorm1d) for m in head) == (len(blocks) == 1)
        assert head(torch.randn(2, *_shape_after(model, plan))).shape == (2, 10)


def _shape_after(model: ModelConfig, plan) -> tuple[int, ...]:
    return unit_shapes(build_network(model, IMAGES, seed=0), IMAGES)[plan.units[-1]]


def test_auglocal_conv_aux_net_pays_the_downsampling_of_the_blocks_it_skips():
    # Cut after the first block of ResNet-32: the aux net of depth 3 copies blocks 5, 9, 14
    # (uniform over 1..14): stride 2 into stage 2 (16 -> 8 px), stride 1 within it, stride 2
    # into stage 3 (8 -> 4 px), with 1x1 projection shortcuts where the shape changes.
    model = ModelConfig(kind="resnet", depth=32, width=4)
    shapes = unit_shapes(build_network(model, IMAGES, seed=0), IMAGES)
    head = build_aux_head(model, IMAGES, (5, 9, 14), shapes[0], shapes)
    blocks = [m for m in head if isinstance(m, BasicBlock)]
    assert [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0]) for b in blocks] == [
        (4, 8, 2),
        (8, 8, 1),
        (8, 16, 2),
    ]
    assert [isinstance(b.shortcut, nn.Sequential) for b in blocks] == [True, False, True]


def test_auglocal_transformer_aux_net_is_fresh_blocks_then_the_next_token_head():
    plans, heads = _plans_and_heads(TRANSFORMER, TOKENS, blocks=2, aux_depth=2)
    assert plans[0].aux_units == (2, 3)
    head = heads[0]
    assert [type(m) for m in head] == [TransformerBlock, TransformerBlock, nn.LayerNorm, nn.Linear]
    assert head(torch.randn(2, 12, 16)).shape == (2, 12, 20)


def test_augmented_heads_cost_more_so_the_first_block_gets_fewer_units():
    plans = plan_blocks(RESNET, IMAGES, blocks=2, aux_head="augmented", aux_depth=3)
    assert len(plans[0].units) < len(plans[1].units)


# --- losses and gradient isolation ----------------------------------------------------


def test_next_token_loss_scores_every_position():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    loss, hits, count = task_loss(logits, targets)
    expected = (
        torch.stack(
            [nn.functional.cross_entropy(logits[b], targets[b], reduction="sum") for b in range(2)]
        ).sum()
        / 10
    )
    assert torch.allclose(loss, expected) and count == 10
    assert int(hits) == int((logits.argmax(-1) == targets).sum())
    summed = task_loss(logits, targets, reduction="sum").loss
    assert torch.allclose(summed, expected * 10)


def test_classification_loss_is_cross_entropy_over_the_batch():
    logits, targets = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0])
    loss, hits, count = task_loss(logits, targets)
    assert torch.allclose(loss, nn.functional.cross_entropy(logits, targets))
    assert (int(hits), count) == (2, 3)


def _two_blocks(model: ModelConfig, spec: InputSpec) -> list[LocalBlock]:
    plans = plan_blocks(model, spec, blocks=2, aux_head="augmented", aux_depth=1)
    optimizer = OptimizerConfig(lr=0.01)
    return [build_block(BlockSpec(p, model, spec, 3, optimizer, 0.01)) for p in plans]


@pytest.mark.parametrize(
    ("model", "spec", "batch"),
    [
        (RESNET, IMAGES, lambda: (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))),
        (
            TRANSFORMER,
            TOKENS,
            lambda: (torch.randint(0, 20, (4, 12)), torch.randint(0, 20, (4, 12))),
        ),
    ],
    ids=["resnet", "transformer"],
)
def test_no_gradient_crosses_a_block_boundary(model, spec, batch):
    torch.manual_seed(0)
    first, second = _two_blocks(model, spec)
    x, y = batch()
    hidden, _ = first.train_step(x, y)
    assert not hidden.requires_grad and hidden.grad_fn is None
    before = [p.detach().clone() for p in first.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in first.parameters()]
    hidden.requires_grad_(True)
    _, stats = second.train_step(hidden, y)
    assert hidden.grad is None
    assert all(torch.equal(b, p) for b, p in zip(before, first.parameters()))
    assert all(
        (g is None and p.grad is None) or torch.equal(g, p.grad)
        for g, p in zip(grads, first.parameters())
    )
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in second.parameters())
    assert stats.count == y.numel()


def test_a_transformer_pipeline_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = ModelConfig(kind="transformer", d_model=16, layers=2, heads=2)
    spec = InputSpec("tokens", (8,), 5)
    plans = plan_blocks(model, spec, blocks=2, aux_head="linear", aux_depth=1)
    optimizer = OptimizerConfig(lr=0.01)
    blocks = [build_block(BlockSpec(p, model, spec, 0, optimizer, 0.01)) for p in plans]
    for _ in range(60):
        start = torch.randint(0, 5, (16, 1))
        stream = (start + torch.arange(9)) % 5
        h, y = stream[:, :-1], stream[:, 1:]
        for block in blocks:
            h, stats = block.train_step(h, y)
    assert stats.correct / stats.count > 0.9


def test_a_one_block_pipeline_keeps_tied_embeddings_one_parameter():
    tied = TRANSFORMER.model_copy(update={"tie_embeddings": True})
    (plan,) = plan_blocks(tied, TOKENS, blocks=1, aux_head="linear", aux_depth=1)
    block = build_block(BlockSpec(plan, tied, TOKENS, 0, OptimizerConfig(), 0.01))
    assert block.head[1].weight is block.body[0][0].tokens.weight
    params = block.parameters()
    assert len({id(p) for p in params}) == len(params)
    assert len(block.optimizer.param_groups[0]["params"]) == len(params)
