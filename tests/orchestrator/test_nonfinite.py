"""The NaN/inf policy's decisions, without Ray: what is watched, what is done, what is said."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.errors import ConfigError
from orchestrator.nonfinite import (
    NonFiniteStep,
    check_policy,
    decide,
    is_watched,
    learning_rates,
    mean_of_applied,
    nonfinite_metrics,
    skipped_figures,
    stop_message,
)

PIPELINE_HEADLINE = ("train/loss", "eval/accuracy")


@pytest.mark.parametrize(
    "key",
    [
        "train/loss",
        "eval/loss",
        "train/data_loss",
        "train/fitness_mean",
        "train/grad_norm",
        "train/update_norm",
        "eval/accuracy",  # a headline figure
    ],
)
def test_losses_fitness_norms_and_headline_figures_are_watched(key: str) -> None:
    assert is_watched(key, PIPELINE_HEADLINE)


@pytest.mark.parametrize(
    "key",
    [
        "train/accuracy",
        "train/samples_per_s",
        "system/busy_fraction",
        "system/loss_scale",
        "block-2/train/local_loss",  # a worker's own: its loss reaches train/loss downstream
        "trial-3/train/loss",  # a PBT trial's: PBT replaces a diverged trial itself
        "loss",
    ],
)
def test_worker_system_and_other_figures_are_not(key: str) -> None:
    assert not is_watched(key, PIPELINE_HEADLINE)


def test_only_watched_figures_that_are_not_finite_are_reported() -> None:
    metrics = {
        "train/loss": math.nan,
        "eval/loss": -math.inf,
        "eval/accuracy": 0.5,
        "train/fitness_max": math.inf,
        "train/samples_per_s": math.inf,
        "block-0/train/local_loss": math.nan,
    }
    assert nonfinite_metrics(metrics, PIPELINE_HEADLINE) == {
        "train/loss": metrics["train/loss"],
        "eval/loss": -math.inf,
        "train/fitness_max": math.inf,
    }


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["train/loss", "eval/accuracy", "train/fitness_mean", "system/x"]),
        st.floats(allow_nan=True, allow_infinity=True),
    )
)
def test_reported_figures_are_exactly_the_watched_non_finite_ones(metrics: dict) -> None:
    bad = nonfinite_metrics(metrics, PIPELINE_HEADLINE)
    for key, value in metrics.items():
        expected = is_watched(key, PIPELINE_HEADLINE) and not math.isfinite(value)
        assert (key in bad) == expected, key


@pytest.mark.parametrize(
    ("policy", "rollbacks", "expected"),
    [
        ("stop", 0, "stop"),
        ("rollback", 0, "rollback"),
        ("rollback", 2, "rollback"),
        ("rollback", 3, "stop"),
        ("rollback", 4, "stop"),
        ("skip", 0, "stop"),  # the workers skipped what they could: nothing was left
    ],
)
def test_rollbacks_are_bounded(policy: str, rollbacks: int, expected: str) -> None:
    assert decide(policy, rollbacks, max_rollbacks=3) == expected


def test_only_learning_rates_are_scaled() -> None:
    pipeline = {"lr/block-0": 0.1, "lr/block-1": 0.02}
    assert learning_rates(pipeline, 0.5) == {"lr/block-0": 0.05, "lr/block-1": 0.01}
    assert learning_rates({"sigma": 0.1, "lr": 0.4}, 0.5) == {"lr": 0.2}
    assert learning_rates({"sigma": 0.1, "lrs": 1.0}, 0.5) == {}


def test_rollback_needs_a_learning_rate_to_halve() -> None:
    with pytest.raises(ConfigError, match=r"run\.nonfinite: 'rollback'.*strategy 'pbt'"):
        check_policy("rollback", "pbt", [])
    check_policy("stop", "pbt", [])
    check_policy("rollback", "eggroll", ["sigma", "lr"])
    check_policy("rollback", "pipeline", ["lr/block-0"])


def test_the_stop_message_names_step_metric_checkpoint_and_fix() -> None:
    event = NonFiniteStep(7, {"train/loss": math.nan, "eval/loss": math.inf})
    kept = "/ckpt/run/attempt (newest: step 6)"

    stopped = stop_message(event, "stop", 0, 3, kept)
    assert stopped.startswith("training diverged at step 7: eval/loss=inf, train/loss=nan")
    assert "because run.nonfinite is 'stop'" in stopped
    assert f"the last good checkpoint is kept in {kept}" in stopped
    assert "set run.nonfinite: rollback" in stopped

    spent = stop_message(event, "rollback", 3, 3, None)
    assert "after 3 rollback(s) with halved learning rates (run.max_rollbacks=3)" in spent
    assert "no checkpoint was written before it" in spent
    assert "set run.nonfinite" not in spent


def test_skip_is_refused_for_a_strategy_that_cannot_drop_an_update() -> None:
    with pytest.raises(ConfigError, match=r"run\.nonfinite: 'skip' is not possible for .*'moe_hc'"):
        check_policy("skip", "moe_hc", ["lr"])
    with pytest.raises(ConfigError, match=r"'moe_hc'.*use run\.nonfinite: rollback or stop"):
        check_policy("skip", "pbt", [], inner_kind="moe_hc")
    for kind in ("pipeline", "backprop", "eggroll"):
        check_policy("skip", kind, ["lr"])
    check_policy("skip", "pbt", [], inner_kind="backprop")


def test_a_steps_loss_is_that_of_its_applied_updates() -> None:
    assert mean_of_applied([1.0, math.nan, 3.0], [True, False, True]) == 2.0
    assert mean_of_applied([1.0, 2.0], [True, True]) == 1.5
    assert math.isnan(mean_of_applied([math.nan, 2.0], [False, False]))  # nothing applied
    assert math.isnan(mean_of_applied([math.nan, 2.0], [True, True]))  # any other policy


def test_skips_are_counted_and_said_once(caplog) -> None:
    with caplog.at_level("WARNING", logger="unlocked"):
        assert skipped_figures(0, "update") == {"system/nonfinite_skipped": 0.0}
        assert not caplog.messages
        assert skipped_figures(3, "member") == {"system/nonfinite_skipped": 3.0}
    [line] = caplog.messages
    assert "left out 3 member(s)" in line and "run.nonfinite: skip" in line


def test_the_stop_message_of_a_step_skip_emptied() -> None:
    event = NonFiniteStep(5, {"train/loss": math.nan})
    message = stop_message(event, "skip", 0, 3, None)
    assert "because run.nonfinite is 'skip' and the step had no finite update left" in message
    assert "set run.nonfinite: rollback" in message
