"""Pictures a person would rather look at than read: learning curves and a busy timeline.

Matplotlib's Agg backend only: the controller often runs headless (a Ray job, CI).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

Series = Sequence[tuple[int, float]]


def learning_curves(curves: Mapping[str, Series], title: str) -> Figure:
    """One panel per metric family (loss, accuracy, fitness, ...), train and eval overlaid;
    ``x_mean``, ``x_max`` and ``x_min`` share the panel of ``x``."""
    families: dict[str, dict[str, Series]] = {}
    for name, points in curves.items():
        if points:
            family = re.sub(r"_(mean|max|min)$", "", name.rsplit("/", 1)[-1])
            families.setdefault(family, {})[name] = points
    fig, axes = plt.subplots(1, max(1, len(families)), figsize=(5 * max(1, len(families)), 3.6))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, (family, series) in zip(axes, sorted(families.items())):
        for name, points in sorted(series.items()):
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_title(family)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def busy_timeline(
    spans: Mapping[str, Sequence[tuple[float, float]]], title: str, window_s: float = 2.0
) -> Figure:
    """Per-worker busy intervals on a shared clock: gaps in a row are a worker waiting.

    Shows the newest spans only (the last ``window_s`` seconds), the steady state where a
    pipeline without bubbles has every row nearly solid.
    """
    rows = {name: list(s) for name, s in spans.items() if s}
    fig, ax = plt.subplots(figsize=(10, 0.6 * max(1, len(rows)) + 1.4))
    if rows:
        end = max(e for s in rows.values() for _, e in s)
        start = max(min(b for s in rows.values() for b, _ in s), end - window_s)
        for i, (_, row) in enumerate(sorted(rows.items())):
            bars = [(b - start, e - b) for b, e in row if e >= start]
            ax.broken_barh(bars, (i - 0.4, 0.8), color=f"C{i % 10}")
        busy = {
            name: sum(min(e, end) - max(b, start) for b, e in row if e >= start) / (end - start)
            for name, row in rows.items()
        }
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{n} ({busy[n]:.0%} busy)" for n in sorted(rows)])
        ax.set_xlim(0, end - start)
    ax.set_xlabel("seconds (newest window)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def lineage(events: Sequence[Any], ends: Mapping[int, int], title: str) -> Figure:
    """PBT: one row per trial over its training steps, coloured by the trial whose initial
    hyperparameters its weights descend from; an arrow is an exploit (donor -> copier).

    ``events`` are ``strategies.pbt.scheduler.Exploit`` records in the order they happened;
    ``ends`` is each trial's last step.
    """
    trials = sorted(ends)
    root = {t: t for t in trials}
    since = {t: 0 for t in trials}
    fig, ax = plt.subplots(figsize=(10, 0.45 * max(1, len(trials)) + 1.6))

    def segment(trial: int, stop: int) -> None:
        ax.plot([since[trial], stop], [trial, trial], color=f"C{root[trial] % 10}", lw=3)

    for event in events:
        segment(event.trial, max(since[event.trial], event.step))
        ax.annotate(
            "",
            xy=(event.step, event.trial),
            xytext=(event.step, event.donor),
            arrowprops={"arrowstyle": "->", "color": "0.35", "lw": 0.8},
        )
        root[event.trial], since[event.trial] = root[event.donor], event.step
    for trial in trials:
        segment(trial, max(since[trial], ends[trial]))
    ax.set_yticks(trials)
    ax.set_yticklabels([f"trial-{t}" for t in trials])
    ax.set_xlabel("training step (inner strategy)")
    handles = [
        plt.Line2D([], [], color=f"C{t % 10}", lw=3, label=f"from trial-{t}") for t in trials
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def solution_fields(reference: Any, prediction: Any, axes: tuple[str, str], title: str) -> Figure:
    """Reference, prediction and their absolute error side by side, on one colour scale
    for the first two (so a wrong amplitude shows), its own for the error."""
    import numpy as np

    error = np.abs(prediction - reference)
    lo, hi = (
        float(min(reference.min(), prediction.min())),
        float(max(reference.max(), prediction.max())),
    )
    fig, panels = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, field, name, limits in (
        (panels[0], reference, "reference solver", (lo, hi)),
        (panels[1], prediction, "prediction", (lo, hi)),
        (panels[2], error, f"|error| (max {error.max():.3g})", (0.0, float(error.max()))),
    ):
        image = ax.imshow(field, origin="lower", aspect="auto", vmin=limits[0], vmax=limits[1])
        ax.set_title(name)
        ax.set_xlabel(f"{axes[1]} (grid index)")
        ax.set_ylabel(f"{axes[0]} (grid index)")
        fig.colorbar(image, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
