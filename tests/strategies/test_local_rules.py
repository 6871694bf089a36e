"""Mono-Forward and MAN on the pipeline: their heads, their math and their config rules."""

from __future__ import annotations

import mlflow
import pytest
import torch
from pydantic import ValidationError

from orchestrator.checkpoint import CheckpointStore
from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig, OptimizerConfig
from strategies.models.heads import MomentumAuxHead, ema_update_, projection_head
from strategies.models.units import forward_flops
from strategies.pipeline.config import PipelineConfig
from strategies.pipeline.local_learning import BlockSpec, build_block, plan_blocks

MLP = ModelConfig(hidden=[16, 24, 32, 40])
TABLE = InputSpec("table", (8,), 3)
IMAGES = InputSpec("image", (1, 8, 8), 10)
TOKENS = InputSpec("tokens", (8,), 16)


def _blocks(model: ModelConfig, spec: InputSpec, blocks: int, **plan: object) -> list:
    plans = plan_blocks(model, spec, blocks=blocks, aux_depth=1, **plan)
    return [
        build_block(BlockSpec(p, model, spec, seed=0, optimizer=OptimizerConfig(), lr=1e-2))
        for p in plans
    ]


def test_ema_moves_each_parameter_by_one_minus_momentum():
    target = {"w": torch.tensor([0.0, 10.0]), "b": torch.tensor([4.0])}
    ema_update_(target, {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}, 0.75)
    assert torch.allclose(target["w"], torch.tensor([0.25, 7.5]))
    assert torch.allclose(target["b"], torch.tensor([3.0]))


def test_ema_refuses_a_source_of_another_shape_of_names():
    with pytest.raises(ValueError, match="do not match"):
        ema_update_({"w": torch.zeros(1)}, {"v": torch.zeros(1)}, 0.9)


def test_projection_head_has_no_bias_and_pools_maps():
    features = projection_head((12,), TABLE)
    assert [p.shape for p in features.parameters()] == [torch.Size([3, 12])]
    maps = projection_head((4, 2, 2), IMAGES)
    assert maps(torch.randn(5, 4, 2, 2)).shape == (5, 10)


def test_projection_head_refuses_token_streams():
    with pytest.raises(ConfigError, match="local_rule: cross_entropy"):
        projection_head((8, 32), TOKENS)


def test_mono_forward_gives_every_local_block_a_projection():
    blocks = _blocks(MLP, TABLE, 4, aux_head="projection")
    for block, width in zip(blocks[:-1], MLP.hidden):
        weights = [p.shape for p in block.head.parameters()]
        assert weights == [torch.Size([3, width])]
    last = blocks[-1]  # the network's own output layer reads the last layer out
    assert [p.shape for p in last.head.parameters()] == [torch.Size([3, 40]), torch.Size([3])]


def test_man_plan_names_the_next_blocks_first_unit_and_costs_its_copies():
    plain = plan_blocks(MLP, TABLE, blocks=2, aux_head="linear", aux_depth=1)
    man = plan_blocks(MLP, TABLE, blocks=2, aux_head="linear", aux_depth=1, momentum=True)
    assert [p.momentum_unit for p in plain] == [None, None]
    assert man[0].momentum_unit == man[1].units[0]
    assert man[1].momentum_unit is None
    # The two copies of a unit make the first block's head dearer, so the cut moves up.
    assert len(man[0].units) <= len(plain[0].units)


def test_man_head_reads_out_the_next_units_shape_and_trains_only_the_learnable_copy():
    first, second = _blocks(MLP, TABLE, 2, aux_head="linear", momentum=True)
    head = first.head
    assert isinstance(head, MomentumAuxHead)
    assert not any(p.requires_grad for p in head.ema.parameters())
    held = {id(p) for group in first.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in held for p in head.ema.parameters())
    assert all(id(p) in held for p in head.learnable.parameters())
    # The copies start apart from each other and from the unit they stand for.
    ema, learnable = head.ema[0].weight, head.learnable[0].weight
    live = second.body[0][0].weight
    assert not torch.equal(ema, learnable) and not torch.equal(ema, live)
    x = torch.randn(6, 8)
    ema_before = ema.clone()
    hidden, stats = first.train_step(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert hidden.shape == (6, first.body[-1][0].out_features)
    assert torch.equal(head.ema[0].weight, ema_before)  # only follow() moves it
    assert stats.count == 6


def test_follow_pulls_the_moving_average_towards_the_next_blocks_unit():
    first, second = _blocks(MLP, TABLE, 2, aux_head="augmented", momentum=True)
    unit = second.first_unit()
    before = {k: v.clone() for k, v in first.head.ema.named_parameters()}
    first.follow(unit, 0.9)
    for name, value in first.head.ema.named_parameters():
        assert torch.allclose(value, 0.9 * before[name] + 0.1 * unit[name])
    with pytest.raises(RuntimeError, match="momentum auxiliary head"):
        second.follow(unit, 0.9)


def test_man_heads_on_a_resnet_copy_the_residual_block_that_follows():
    model = ModelConfig(kind="resnet", depth=8, width=4)
    first, second = _blocks(model, IMAGES, 2, aux_head="linear", momentum=True)
    ema = dict(first.head.ema.named_parameters())
    assert ema.keys() == second.first_unit().keys()
    shape = (4, 8, 8)
    assert forward_flops(first.head, shape) > 0
    out = first.head(torch.randn(2, *first.body(torch.randn(2, 1, 8, 8)).shape[1:]))
    assert out.shape == (2, 10)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"momentum_aux": {}, "local_rule": "mono_forward"}, "remove momentum_aux"),
        ({"momentum_aux": {}, "blocks": 1}, "set blocks >= 2"),
        ({"momentum_aux": {"momentum": 1.0}}, "less than 1"),
        ({"forward_forward": {"threshold": 2.0}}, "forward_forward options apply"),
    ],
)
def test_rule_options_that_do_not_fit_are_refused(fields: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        PipelineConfig(**fields)


def test_rule_choices_name_their_heads():
    assert PipelineConfig(local_rule="mono_forward").head_kind() == "projection"
    assert PipelineConfig(aux_head="linear").head_kind() == "linear"
    assert PipelineConfig(local_rule="forward_forward", blocks=2).head_kind() == "linear"


def test_man_run_follows_the_next_block(ray_local, tmp_path, dataset_root):
    """A 2-block MAN pipeline on local Ray: block 0's moving average ends between its
    start and block 1's first unit, and checkpoints hold it."""
    import unlocked
    from tests.conftest import small_config

    raw = small_config(
        tmp_path,
        dataset_root,
        strategy={"aux_head": "linear", "momentum_aux": {"momentum": 0.9}},
        tracking={"enabled": False},
        stop={"max_steps": 3},
    )
    result = unlocked.run(raw)
    assert result.metrics["block-0/eval/aux_accuracy"] > 0.2  # 10 classes: it learned
    store = CheckpointStore(result.checkpoint_dir)
    state = store.load(store.latest())
    ema = state["block-0"]["head"]["ema.0.weight"]
    live = state["block-1"]["body"]["0.0.weight"]
    fresh = (
        _blocks(
            ModelConfig(hidden=[64, 64, 64, 64]),
            InputSpec("table", (64,), 10),
            3,
            aux_head="linear",
            momentum=True,
        )[0]
        .head.ema[0]
        .weight
    )
    assert torch.dist(ema, live) < 0.5 * torch.dist(fresh, live)


def test_forward_forward_run_learns_and_exports_its_classifier(ray_local, tmp_path, dataset_root):
    """A 2-layer Forward-Forward pipeline on local Ray: held-out accuracy from accumulated
    goodness is far above chance, and the exported model is the goodness classifier."""
    import unlocked
    from strategies.pipeline.forward_forward import ForwardForwardClassifier
    from tests.conftest import small_config

    raw = small_config(
        tmp_path,
        dataset_root,
        strategy={
            "blocks": 2,
            "local_rule": "forward_forward",
            "forward_forward": {"skip_first": False},
            "optimizer": {"kind": "adam", "lr": 0.01},
        },
        model={"hidden": [64, 64], "norm": "none"},
        stop={"max_steps": 10},
        eval={"every": 10},
    )
    raw["strategy"].pop("aux_head")
    raw["strategy"].pop("aux_depth")
    result = unlocked.run(raw)
    assert result.metrics["eval/accuracy"] > 0.3  # 10 classes
    assert result.metrics["train/accuracy"] > 0.0
    # The published model is the goodness classifier (label concatenated to 64 features).
    client = mlflow.MlflowClient(result.tracking_uri)
    path = client.download_artifacts(result.mlflow_run_id, "model/model.pt", str(tmp_path))
    classifier = ForwardForwardClassifier(
        [torch.nn.Sequential(torch.nn.Linear(74, 64), torch.nn.ReLU()) for _ in range(2)],
        10,
        "concat",
        skip_first=False,
    )
    state = torch.load(path, weights_only=True)
    assert state.keys() == classifier.state_dict().keys()
    assert state["units.0.0.weight"].shape == (64, 74)
