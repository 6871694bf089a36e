"""One metric naming scheme: ``[<worker>/]<scope>/<name>``, scope train, eval or system."""

from __future__ import annotations

import pytest

from strategies.base import metric_scope
from strategies.pipeline.driver import summarize
from workers.messages import BlockRecord


@pytest.mark.parametrize(
    ("key", "scope"),
    [
        ("train/loss", "train"),
        ("eval/accuracy", "eval"),
        ("system/failures", "system"),
        ("train/hp/lr", "train"),
        ("block-1/train/local_loss", "train"),
        ("block-12/eval/aux_accuracy", "eval"),
        ("trainer-0/system/busy_fraction", "system"),
        ("population-3/system/peak_training_mb", "system"),
        ("trial-2/train/hp/sigma", "train"),
        ("slot-0/block-1/system/peak_training_mb", "system"),
    ],
)
def test_a_scoped_key_names_its_scope(key, scope):
    assert metric_scope(key) == scope


@pytest.mark.parametrize(
    "key",
    [
        "samples_per_s",  # no scope
        "resynced_workers",
        "block-1/local_loss",  # a worker's metric without a scope
        "expert-0/solve_s",
        "trial-1/hp/lr",
        "pbt/best_score",  # not one of the three scopes
        "Train/loss",
        "train/",  # no name
        "train",
        "block/train/loss",  # a worker name carries its index
        "",
    ],
)
def test_a_key_outside_the_scheme_has_no_scope(key):
    assert metric_scope(key) is None


def test_the_pipeline_summaries_follow_the_scheme():
    chain = [BlockRecord(k, 1.0, 5, 10, float(k), k + 0.5) for k in range(2)]
    train = summarize([chain], wall_s=1.0)
    held_out = summarize([chain], wall_s=0.0, scope="eval")
    assert train and all(metric_scope(k) in ("train", "system") for k in train)
    assert held_out and all(metric_scope(k) == "eval" for k in held_out)
