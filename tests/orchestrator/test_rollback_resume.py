"""A run that rolled back (``run.nonfinite: rollback``) holds each step once in its history,
and ``--resume`` goes on with the rates the rollback halved and the rollbacks it has left.
End to end on the session's local Ray, one worker."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import unlocked
from orchestrator.nonfinite import NonFiniteStop
from tests.conftest import on_step, small_config

pytestmark = pytest.mark.slow


def rolling_back_run(tmp_path: Path, dataset_root: Path) -> dict[str, Any]:
    """Backprop at a sound rate, 7 steps, a checkpoint every 2, one rollback allowed."""
    raw = small_config(
        tmp_path,
        dataset_root,
        run={"name": "test-run", "seed": 0, "nonfinite": "rollback", "max_rollbacks": 1},
        tracking={"enabled": False},
        stop={"max_steps": 7},
        checkpoint={"every": 2, "keep": 2},
        eval={"every": 100},  # none: neither run gets to its final evaluation
    )
    strategy = {"kind": "backprop", "batches_per_step": 1, "optimizer": {"kind": "sgd", "lr": 0.08}}
    return {**raw, "strategy": strategy}


def diverge_next_step(run: Any) -> None:
    """The strategy's next step trains as usual and reports a NaN loss (a rollback builds a
    new strategy, so only this one step does)."""
    step = run.strategy.step
    run.strategy.step = lambda: {**step(), "train/loss": math.nan}


def test_a_resumed_run_keeps_its_halved_rate_and_its_spent_rollbacks(
    ray_local, tmp_path, dataset_root
):
    raw = rolling_back_run(tmp_path, dataset_root)
    seen: list[tuple[int, int, float, float]] = []
    ran: list[tuple[int, dict]] = []

    def diverge_at_4_then_stop_at_5(run: Any, step: int, metrics: dict) -> None:
        seen.append((step, run.rollbacks, run.lr_factor, run.strategy.lr))
        ran.append((step, metrics))
        if step == 3 and not run.rollbacks:
            diverge_next_step(run)  # step 4: back to checkpoint 2, rate halved
        if step == 5:
            run.controller.stop_signal = "SIGTERM"

    first = unlocked.run(raw, callbacks=[on_step(diverge_at_4_then_stop_at_5)])
    assert first.stopped_by == "SIGTERM" and first.step == 5
    assert seen[-1] == (5, 1, 0.5, 0.04)
    assert [s for s, _ in ran] == [1, 2, 3, 3, 4, 5]
    assert [s for s, _ in first.history] == [1, 2, 3, 4, 5]  # step 3 once: its replay
    assert first.history[2][1] is ran[3][1] and ran[3][1] != ran[2][1]

    seen.clear()

    def diverge_after_6(run: Any, step: int, _metrics: dict) -> None:
        seen.append((step, run.rollbacks, run.lr_factor, run.strategy.lr))
        diverge_next_step(run)

    with pytest.raises(NonFiniteStop, match=r"step 7: .* after 1 rollback\(s\)"):
        unlocked.run(raw, resume=True, callbacks=[on_step(diverge_after_6)])
    assert seen == [(6, 1, 0.5, 0.04)]  # the rollback it spent before is not given back
