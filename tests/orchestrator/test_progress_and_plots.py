"""Progress output off a terminal, and the plots' content."""

from __future__ import annotations

import logging

from orchestrator.plots import busy_timeline, learning_curves
from orchestrator.progress import StepProgress


def test_progress_off_a_terminal_logs_plain_lines(caplog):
    caplog.set_level(logging.INFO, logger="unlocked")
    with StepProgress(
        total=3, headline=("train/loss", "eval/accuracy"), tty=False, every_s=0.0
    ) as progress:
        for step in (1, 2, 3):
            progress.update(step, {"train/loss": 1.0 / step, "other": 5.0})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[-1].startswith("step 3/3") and "train/loss=0.3333" in lines[-1]
    assert "other" not in lines[-1]


def test_progress_throttles_lines(caplog):
    caplog.set_level(logging.INFO, logger="unlocked")
    with StepProgress(total=100, headline=("train/loss",), tty=False, every_s=3600) as progress:
        for step in range(1, 101):
            progress.update(step, {})
    # The first line, then only the final step.
    assert len(caplog.records) == 2


def test_timeline_labels_each_worker_with_its_busy_share():
    spans = {"block-0": [(0.0, 1.0), (1.5, 2.0)], "block-1": [(0.0, 2.0)]}
    fig = busy_timeline(spans, "t", window_s=2.0)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["block-0 (75% busy)", "block-1 (100% busy)"]


def test_learning_curves_group_metrics_by_family():
    fig = learning_curves(
        {
            "train/loss": [(1, 2.0), (2, 1.0)],
            "eval/loss": [(2, 1.5)],
            "eval/accuracy": [(2, 0.5)],
            "train/accuracy": [],
        },
        "run",
    )
    assert sorted(ax.get_title() for ax in fig.axes) == ["accuracy", "loss"]


def test_mean_max_min_share_one_panel():
    fig = learning_curves(
        {
            "train/fitness_mean": [(1, 1.0)],
            "train/fitness_max": [(1, 2.0)],
            "eval/return": [(1, 3.0)],
            "eval/return_min": [(1, 0.5)],
        },
        "run",
    )
    assert sorted(ax.get_title() for ax in fig.axes) == ["fitness", "return"]
