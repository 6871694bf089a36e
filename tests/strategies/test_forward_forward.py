"""Forward-Forward's math and its pipeline block, without Ray."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import MLPConfig, ModelConfig, OptimizerConfig
from strategies.pipeline.config import ForwardForwardConfig
from strategies.pipeline.forward_forward import (
    ForwardForwardBlock,
    build_forward_forward_block,
    counts_goodness,
    embed_label,
    ff_loss,
    ff_loss_over_labels,
    forward_forward_classifier,
    goodness,
    input_width,
    label_copies,
    label_scores,
    rms_normalise,
    wrong_labels,
)
from strategies.pipeline.local_learning import BlockPlan, BlockSpec, plan_blocks

FF = ForwardForwardConfig()


def table(features: int, classes: int) -> InputSpec:
    return InputSpec("table", (features,), classes)


def ff_blocks(
    hidden: list[int],
    spec: InputSpec,
    lr: float = 0.01,
    ff: ForwardForwardConfig = FF,
    seed: int = 3,
) -> list[ForwardForwardBlock]:
    model = ModelConfig(hidden=hidden, norm="none")
    plans = plan_blocks(model, spec, len(hidden), "linear", 1)
    return [
        build_forward_forward_block(
            BlockSpec(
                plan,
                model,
                spec,
                seed=seed,
                optimizer=OptimizerConfig(lr=lr),
                lr=lr,
                forward_forward=ff,
            )
        )
        for plan in plans
    ]


def train_chain(blocks: list[ForwardForwardBlock], x: torch.Tensor, y: torch.Tensor) -> list:
    stats, hidden = [], x
    for block in blocks:
        hidden, s = block.train_step(hidden, y)
        stats.append(s)
    return stats


def eval_chain(blocks: list[ForwardForwardBlock], x: torch.Tensor, y: torch.Tensor):
    hidden, carry, stats = x, None, []
    for block in blocks:
        hidden, s, carry = block.eval_step(hidden, y, carry)
        stats.append(s)
    return carry, stats


# -- the pure functions ----------------------------------------------------------------


def test_rms_normalise_scales_each_row_to_rms_one():
    h = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 1.0]])
    out = rms_normalise(h)
    rms = math.sqrt((9 + 16) / 2)
    assert torch.allclose(out[0], torch.tensor([3 / rms, 4 / rms]))
    assert torch.equal(out[1], torch.zeros(2))  # no division by zero
    assert torch.allclose(out[2], torch.tensor([-1.0, 1.0]))
    assert torch.allclose(out[[0, 2]].pow(2).sum(dim=1), torch.tensor([2.0, 2.0]))


def test_rms_normalise_keeps_the_dtype():
    h = torch.randn(4, 16).to(torch.bfloat16)
    out = rms_normalise(h)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float().pow(2).mean(dim=1), torch.ones(4), atol=2e-2)


def test_embed_label_concat_appends_a_one_hot_row():
    x = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    out = embed_label(x, torch.tensor([2, 0]), 3, "concat")
    assert torch.equal(out, torch.tensor([[5.0, 6.0, 0, 0, 1], [7.0, 8.0, 1, 0, 0]]))


def test_embed_label_overwrite_replaces_the_first_features():
    x = torch.arange(10.0).reshape(2, 5)
    out = embed_label(x, torch.tensor([1, 2]), 3, "overwrite")
    assert torch.equal(out, torch.tensor([[0.0, 1, 0, 3, 4], [0.0, 0, 1, 8, 9]]))
    assert torch.equal(x, torch.arange(10.0).reshape(2, 5))  # the input is not modified


def test_embed_label_takes_a_neutral_label_as_is():
    x = torch.zeros(1, 12)
    neutral = torch.full((1, 10), 0.1)
    assert torch.equal(embed_label(x, neutral, 10, "overwrite")[0, :10], torch.full((10,), 0.1))
    assert embed_label(x, neutral, 10, "concat").shape == (1, 22)
    with pytest.raises(ValueError, match="label vectors"):
        embed_label(x, torch.full((1, 9), 0.1), 10, "concat")
    with pytest.raises(ValueError, match="cannot overwrite 10"):
        embed_label(torch.zeros(1, 8), torch.tensor([3]), 10, "overwrite")


def test_wrong_labels_are_never_true_and_cover_every_other_class():
    y = torch.arange(5).repeat(2000)
    wrong = wrong_labels(y, 5, torch.Generator().manual_seed(0))
    assert not (wrong == y).any()
    for true in range(5):
        drawn = wrong[y == true]
        counts = torch.bincount(drawn, minlength=5)
        assert counts[true] == 0
        others = counts[torch.arange(5) != true].float()
        # 2000 draws over 4 classes: 500 each, sd ~19.
        assert (others - 500).abs().max() < 100, counts


@settings(max_examples=100, deadline=None)
@given(classes=st.integers(2, 50), rows=st.integers(1, 64), seed=st.integers(0, 2**31))
def test_wrong_labels_stay_in_range_and_off_the_true_class(classes: int, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (rows,), generator=g)
    wrong = wrong_labels(y, classes, g)
    assert ((wrong >= 0) & (wrong < classes) & (wrong != y)).all()


def test_wrong_labels_come_from_the_generator_alone():
    y = torch.randint(0, 7, (64,))
    a = wrong_labels(y, 7, torch.Generator().manual_seed(4))
    torch.manual_seed(99)  # the process RNG plays no part
    b = wrong_labels(y, 7, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_goodness_is_the_sum_of_squares_per_row():
    h = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    assert torch.equal(goodness(h), torch.tensor([5.0, 9.0]))


def test_ff_loss_is_hintons_logistic_on_both_halves():
    theta = 2.0
    g_pos, g_neg = torch.tensor([3.0, 2.0]), torch.tensor([0.0, 2.0])
    # -log σ(1), -log σ(0), -log(1 - σ(-2)), -log(1 - σ(0))
    terms = [
        -math.log(1 / (1 + math.exp(-1))),
        math.log(2),
        -math.log(1 - 1 / (1 + math.exp(2))),
        math.log(2),
    ]
    assert ff_loss(g_pos, g_neg, theta).item() == pytest.approx(sum(terms) / 4)
    assert ff_loss(g_pos, g_neg, theta, reduction="sum").item() == pytest.approx(sum(terms))


def test_ff_loss_pushes_positive_goodness_up_and_negative_down():
    g_pos = torch.tensor([1.0, 5.0, 9.0], requires_grad=True)
    g_neg = torch.tensor([1.0, 5.0, 9.0], requires_grad=True)
    ff_loss(g_pos, g_neg, threshold=5.0).backward()
    assert (g_pos.grad < 0).all()  # descent raises positive goodness
    assert (g_neg.grad > 0).all()  # and lowers negative goodness
    # The push fades once a row is on the right side of θ (logistic, not hinge at 0).
    assert g_pos.grad[0].abs() > g_pos.grad[2].abs()
    assert g_neg.grad[2].abs() > g_neg.grad[0].abs()


def test_ff_loss_over_labels_is_the_expected_training_loss_summed():
    theta = 1.0
    scores = torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 2])

    def sp(v: float) -> float:
        return math.log1p(math.exp(v))

    first = 0.5 * (sp(theta - 3.0) + (sp(0.0 - theta) + sp(1.0 - theta)) / 2)
    second = 0.5 * (sp(0.0) + (sp(0.0) + sp(0.0)) / 2)
    got = ff_loss_over_labels(scores, y, theta).item()
    assert got == pytest.approx(first + second)


def test_label_copies_and_scores_share_one_layout():
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    rows = label_copies(x, 3, "concat")
    assert rows.shape == (6, 5)
    # Row i*C + c is example i with label c.
    assert torch.equal(rows[:, 2:].argmax(dim=1), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.allclose(rows[4], rms_normalise(torch.tensor([[2.0, 0, 0, 1, 0]]))[0])
    g = torch.arange(6.0)
    assert torch.equal(label_scores(g, 2, 3), torch.tensor([[0.0, 1, 2], [3, 4, 5]]))
    with pytest.raises(ValueError, match="5 goodness values"):
        label_scores(torch.zeros(5), 2, 3)


def test_only_a_first_layer_with_layers_after_it_is_skipped():
    assert not counts_goodness(0, is_last=False, skip_first=True)
    assert counts_goodness(0, is_last=True, skip_first=True)  # a one-layer net counts it
    assert counts_goodness(0, is_last=False, skip_first=False)
    assert counts_goodness(1, is_last=False, skip_first=True)


def test_input_width_adds_the_label_or_overwrites_it():
    assert input_width(table(8, 4), FF) == 12
    assert input_width(table(8, 4), ForwardForwardConfig(label_input="overwrite")) == 8
    with pytest.raises(ConfigError, match="strategy.forward_forward.label_input.*concat"):
        input_width(table(8, 10), ForwardForwardConfig(label_input="overwrite"))
    with pytest.raises(ConfigError, match="strategy.local_rule"):
        input_width(InputSpec("image", (1, 8, 8), 10), FF)


# -- the block -------------------------------------------------------------------------


def test_block_reads_the_labelled_width_and_defaults_theta_to_the_layer_width():
    first, second = ff_blocks([16, 24], table(8, 4))
    assert first.body[0][0].in_features == 12
    assert second.body[0][0].in_features == 16
    assert (first.threshold, second.threshold) == (16.0, 24.0)
    assert (first.first, second.first) == (True, False)
    assert (first.counted, second.counted) == (False, True)
    assert len(list(first.head.parameters())) == 0
    (only,) = ff_blocks([16], table(8, 4), ff=ForwardForwardConfig(threshold=3.5))
    assert only.threshold == 3.5 and only.counted


def test_block_refuses_more_than_one_layer():
    model = ModelConfig(hidden=[8, 8], norm="none")
    spec = BlockSpec(
        BlockPlan(index=0, units=(0, 1), is_last=True),
        model,
        table(4, 2),
        seed=0,
        optimizer=OptimizerConfig(),
        lr=1e-3,
        forward_forward=FF,
    )
    with pytest.raises(ConfigError, match="strategy.blocks"):
        build_forward_forward_block(spec)


def test_train_step_passes_on_normalised_positive_and_negative_rows():
    first, second = ff_blocks([16, 16], table(8, 4))
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    before = [p.detach().clone() for p in first.parameters()]
    hidden, stats = first.train_step(x, y)
    assert hidden.shape == (10, 16) and not hidden.requires_grad
    live = hidden.pow(2).sum(dim=1) > 0
    assert torch.allclose(hidden[live].pow(2).mean(dim=1), torch.ones(int(live.sum())))
    assert stats.count == 5 and 0 <= stats.correct <= 5 and stats.loss > 0  # examples
    assert any(not torch.equal(a, b) for a, b in zip(before, first.parameters()))
    _, stats2 = second.train_step(hidden, y)
    assert stats2.count == 5
    with pytest.raises(ValueError, match="2 positive-then-negative rows per example"):
        second.train_step(hidden[:8], y)


def test_eval_carry_sums_goodness_of_counted_layers():
    blocks = ff_blocks([16, 16, 16], table(8, 4))
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    hidden, stats, carry = blocks[0].eval_step(x, y, None)
    assert hidden.shape == (24, 16)
    assert torch.equal(carry, torch.zeros(6, 4))  # the first layer is skipped
    assert stats.count == 6
    rows = label_copies(x, 4, "concat")
    own = label_scores(goodness(blocks[0].body(rows)), 6, 4)
    assert stats.correct == int((own.argmax(dim=1) == y).sum())  # judged on its own goodness
    hidden2, _, carry2 = blocks[1].eval_step(hidden, y, carry)
    expected = label_scores(goodness(blocks[1].body(hidden)), 6, 4)
    assert torch.allclose(carry2, expected)
    _, _, carry3 = blocks[2].eval_step(hidden2, y, carry2)
    assert torch.allclose(carry3, expected + label_scores(goodness(blocks[2].body(hidden2)), 6, 4))


def separable(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes of 8 features around well-apart centres."""
    centres = torch.tensor(
        [
            [3.0, 0, 0, 0, 1, 0, 0, 0],
            [0, 3.0, 0, 0, 0, 1, 0, 0],
            [0, 0, 3.0, 0, 0, 0, 1, 0],
            [0, 0, 0, 3.0, 0, 0, 0, 1],
        ]
    )
    y = torch.randint(0, 4, (n,), generator=generator)
    return centres[y] + 0.5 * torch.randn(n, 8, generator=generator), y


def test_two_ff_blocks_learn_a_separable_problem_through_the_eval_chain():
    data = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    blocks = ff_blocks([32, 32], table(8, 4), lr=0.01)
    x_test, y_test = separable(512, data)
    carry, _ = eval_chain(blocks, x_test, y_test)
    before = (carry.argmax(dim=1) == y_test).float().mean().item()
    for _ in range(300):
        train_chain(blocks, *separable(64, data))
    carry, stats = eval_chain(blocks, x_test, y_test)
    after = (carry.argmax(dim=1) == y_test).float().mean().item()
    assert after >= 0.95, (before, after)
    assert stats[-1].correct == int(after * 512 + 0.5)
    assert before < 0.6, before  # it is the training that got it there


def test_restore_draws_the_same_negatives_as_an_uninterrupted_run():
    spec = table(8, 4)
    (block,) = ff_blocks([16], spec)
    data = torch.Generator().manual_seed(1)
    for _ in range(3):
        block.train_step(*separable(8, data))
    saved = copy.deepcopy(block.state())
    x, y = separable(8, data)
    expected, stats = block.train_step(x, y)
    (fresh,) = ff_blocks([16], spec, seed=7)  # other weights and other negatives
    fresh.restore(saved)
    got, stats2 = fresh.train_step(x, y)
    assert torch.equal(got, expected)
    assert stats2 == stats


def test_exported_classifier_equals_the_chained_eval():
    spec = table(8, 4)
    data = torch.Generator().manual_seed(2)
    for skip_first in (True, False):
        ff = ForwardForwardConfig(skip_first=skip_first)
        blocks = ff_blocks([16, 16, 16], spec, ff=ff)
        for _ in range(5):
            train_chain(blocks, *separable(16, data))
        x, y = separable(20, data)
        carry, _ = eval_chain(blocks, x, y)
        exports = [{"body": b.body.state_dict(), "head": b.head.state_dict()} for b in blocks]
        model = MLPConfig(hidden=[16, 16, 16], norm="none")
        classifier = forward_forward_classifier(ff, model, spec, 3, exports)
        with torch.no_grad():
            scores = classifier(x)
        assert torch.allclose(scores, carry, rtol=1e-5, atol=1e-4)
        with torch.no_grad():
            rows, per_layer = label_copies(x, 4, "concat"), []
            for b in blocks:
                h = b.body(rows)
                per_layer.append(label_scores(goodness(h), 20, 4))
                rows = rms_normalise(h)
        counted = per_layer[1:] if skip_first else per_layer
        assert torch.allclose(scores, sum(counted), rtol=1e-5, atol=1e-4)
