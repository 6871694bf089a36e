"""The chaos benchmark's arithmetic: outcomes, the kill schedule, the flatness judge."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import chaos_workers
from benchmarks.chaos_outcome import ChaosTotals, FaultOutcome, duplicated_and_missing, metric_delta
from benchmarks.chaos_workers import (
    SeededKiller,
    comparable_metrics,
    compare_logs,
    growth_per_minute,
    is_flat,
    kill_steps,
)


def outcome(**changes) -> FaultOutcome:
    fields = dict(
        scenario="worker kills",
        strategy="pipeline",
        faults_injected=2,
        faults_recovered=2,
        steps_duplicated=0,
        steps_missing=0,
        metric_delta=0.0,
        seconds=1.0,
    )
    return FaultOutcome(**{**fields, **changes})


# -- chaos_outcome ------------------------------------------------------------------------
def test_duplicated_and_missing_count_extra_and_absent_steps():
    assert duplicated_and_missing([1, 2, 2, 3, 3, 3], [1, 2, 3, 4]) == (3, 1)
    assert duplicated_and_missing([1, 2, 3], range(1, 4)) == (0, 0)
    assert duplicated_and_missing([], [1, 2]) == (0, 2)


def test_metric_delta_is_the_largest_difference_over_shared_metrics():
    reference = {"eval/accuracy": 0.9, "train/loss": 0.5, "only/here": 1.0}
    assert metric_delta(reference, {"eval/accuracy": 0.85, "train/loss": 0.5}) == pytest.approx(
        0.05
    )
    assert metric_delta(reference, {"train/loss": math.nan}) == math.inf
    with pytest.raises(ValueError, match="no metric in common"):
        metric_delta(reference, {"eval/loss": 1.0})


def test_an_outcome_is_clean_only_when_every_fault_recovered_and_no_step_is_off():
    assert outcome().clean
    assert not outcome(faults_recovered=1).clean
    assert not outcome(steps_duplicated=1).clean
    assert not outcome(steps_missing=1).clean


def test_totals_add_counts_and_keep_the_worst_delta():
    totals = ChaosTotals()
    assert totals.figures()["metric_delta"] == 0.0
    totals.add(outcome(metric_delta=0.01, steps_missing=1))
    totals.add(outcome(faults_injected=3, faults_recovered=1, metric_delta=0.2))
    assert totals.figures() == {
        "faults_injected": 5,
        "faults_recovered": 3,
        "steps_duplicated": 0,
        "steps_missing": 1,
        "metric_delta": 0.2,
    }


# -- the kill schedule ----------------------------------------------------------------------
def test_kill_steps_follow_the_seed():
    assert kill_steps(0, 6, 2) == kill_steps(0, 6, 2)
    schedules = {tuple(kill_steps(seed, 20, 3)) for seed in range(10)}
    assert len(schedules) > 1
    assert kill_steps(0, 6, 0) == []
    assert kill_steps(0, 3, 3) == [1, 2, 3]  # the last step too


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), max_steps=st.integers(1, 50), data=st.data())
def test_kill_steps_are_distinct_ordered_and_within_the_run(seed, max_steps, data):
    kills = data.draw(st.integers(0, max_steps))
    steps = kill_steps(seed, max_steps, kills)
    assert len(steps) == kills
    assert steps == sorted(set(steps))
    assert all(1 <= s <= max_steps for s in steps)


def test_more_kills_than_steps_is_refused():
    with pytest.raises(ValueError, match="kills: 7 must be in 0..6"):
        kill_steps(0, 6, 7)


def test_the_killer_kills_once_per_scheduled_step_though_recovery_replays_it(monkeypatch):
    killed: list[str] = []
    monkeypatch.setattr(chaos_workers, "run_actors", lambda name: [f"{name}/w-{i}" for i in "abc"])
    monkeypatch.setattr(chaos_workers.ray, "get_actor", lambda name: name)
    monkeypatch.setattr(chaos_workers.ray, "kill", lambda actor, no_restart: killed.append(actor))
    run = SimpleNamespace(config=SimpleNamespace(run_name="r"))

    def victims(seed: int) -> list[str]:
        killed.clear()
        killer = SeededKiller([2, 4], seed)
        for step in [1, 2, 2, 3, 4, 3, 4, 5]:  # two losses, each replaying a step
            killer.on_step_end(run, step, {})
        assert killer.victims == killed
        return list(killed)

    first = victims(seed=1)
    assert len(first) == 2 and set(first) <= {"r/w-a", "r/w-b", "r/w-c"}
    assert victims(seed=1) == first
    assert any(victims(seed) != first for seed in range(2, 12))


# -- comparing runs -------------------------------------------------------------------------
def test_comparable_metrics_drop_timings_memory_and_failure_counters():
    metrics = {
        "eval/accuracy": 0.9,
        "train/loss": 0.3,
        "block-0/eval/aux_accuracy": 0.8,
        "trial-1/train/hp/lr": 0.01,
        "expert-0/train/converged_fraction": 1.0,
        "train/samples_per_s": 900.0,
        "train/members_per_s": 900.0,
        "system/busy_fraction": 0.7,
        "system/failures": 2.0,
        "expert-0/train/solve_s": 0.1,
        "block-0/system/peak_training_mb": 3.0,
        "system/exploit_overhead": 0.1,
    }
    assert comparable_metrics(metrics) == {
        "eval/accuracy": 0.9,
        "train/loss": 0.3,
        "block-0/eval/aux_accuracy": 0.8,
        "trial-1/train/hp/lr": 0.01,
        "expert-0/train/converged_fraction": 1.0,
    }


def test_compare_logs_counts_repeats_and_gaps_against_the_reference():
    reference = {"train/loss": [1, 2, 3], "block-0/train/local_loss": [1, 2, 3]}
    assert compare_logs(reference, {k: list(v) for k, v in reference.items()}) == (0, 0)
    faulted = {
        "train/loss": [1, 2, 2, 3],
        "block-0/train/local_loss": [1, 3],
        "block-0/train/extra": [1, 1, 1],  # a metric the reference never logged
    }
    assert compare_logs(reference, faulted) == (3, 1)


# -- the soak's flatness judge ----------------------------------------------------------------
def test_growth_per_minute_is_the_slope_of_the_last_half():
    rising = [(t * 10.0, 100.0 + t * 0.5) for t in range(20)]  # 0.5 per 10 s = 3 per minute
    assert growth_per_minute(rising) == pytest.approx(3.0)
    warm_then_flat = [(t * 10.0, min(t, 5) * 50.0) for t in range(20)]
    assert growth_per_minute(warm_then_flat) == pytest.approx(0.0)


def test_samples_caught_mid_recovery_do_not_set_the_trend():
    steady = [(t * 10.0, 900.0) for t in range(40)]
    for k in (22, 28, 35):  # a worker gone (a dip), its replacement importing (a spike)
        steady[k] = (steady[k][0], 300.0 if k % 2 else 1500.0)
    assert growth_per_minute(steady) == pytest.approx(0.0)


def test_the_footprint_counts_the_tree_and_sets_the_log_monitor_apart(tmp_path):
    import psutil

    from benchmarks.chaos_workers import process_footprint

    script = "import sys, time; handles = [open(sys.argv[0]) for _ in range(9)]; time.sleep(30)"
    (tmp_path / "log_monitor.py").write_text(script)
    alone = process_footprint(psutil.Process())
    child = subprocess.Popen([sys.executable, str(tmp_path / "log_monitor.py")])
    try:
        deadline = time.monotonic() + 20
        while (found := process_footprint(psutil.Process())).log_monitor_files < 12:
            assert time.monotonic() < deadline, found
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    assert found.files == alone.files and found.memory_mb > alone.memory_mb


def test_growth_needs_samples_spread_over_time():
    with pytest.raises(ValueError, match="need at least 3"):
        growth_per_minute([(0.0, 1.0), (1.0, 2.0)])
    with pytest.raises(ValueError, match="spread over time"):
        growth_per_minute([(5.0, 1.0)] * 6)


def test_flat_means_under_the_threshold():
    assert is_flat(0.3, 2.0)
    assert is_flat(-5.0, 2.0)
    assert not is_flat(2.0, 2.0)
    assert not is_flat(12.0, 2.0)
