"""PBT's decisions without Ray: ranking, exploit/explore, fairness, lineage, checkpoints."""

from __future__ import annotations

import random

import pytest

from strategies.pbt.scheduler import PbtScheduler, quantiles
from strategies.pbt.search_space import Distribution, explore, sample_space

SPACE = {"lr": Distribution(loguniform=(1e-4, 1e-1))}


def scheduler(population: int = 4, synchronous: bool = False, seed: int = 0, **kw):
    options = {
        "mode": "max",
        "quantile_fraction": 0.25,
        "resample_probability": 0.25,
        "factors": [0.8, 1.2],
        "synchronous": synchronous,
        "seed": seed,
    }
    return PbtScheduler(population, SPACE, **{**options, **kw})


def test_quantiles_follow_ray_tune():
    scores = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.7, 4: 0.3}
    assert quantiles(scores, "max", 0.25) == ([0, 4], [3, 1])  # ceil(5 * 0.25) = 2
    assert quantiles(scores, "min", 0.25) == ([1, 3], [4, 0])
    assert quantiles(scores, "max", 0.5) == ([0, 4], [3, 1])  # at most half
    assert quantiles({0: 1.0}, "max", 0.5) == ([], [])
    assert quantiles(scores, "max", 0.0) == ([], [])
    assert quantiles({0: float("nan"), 1: 0.0}, "max", 0.5) == ([0], [1])


def test_initial_values_are_samples_of_the_space_in_trial_order():
    sched = scheduler(seed=3)
    rng = random.Random(3)
    expected = [sample_space(SPACE, rng) for _ in range(4)]
    assert [t.hyperparameters for t in sched.trials] == expected
    assert all(t.schedule == [(0, t.hyperparameters)] for t in sched.trials)


def test_async_exploit_and_explore_give_the_exact_expected_decisions():
    sched = scheduler(seed=0)
    rng = random.Random(0)
    initial = [sample_space(SPACE, rng) for _ in range(4)]
    for _ in range(4):
        sched.next_trial()
    # Trial 2 reports first: nothing to rank against.
    assert sched.report(2, 5, 0.5) == []
    # Trial 0 reports worse than trial 2: with two scores it is the bottom one.
    events = sched.report(0, 5, 0.1)
    assert len(events) == 1
    event = events[0]
    assert (event.trial, event.donor, event.step, event.score) == (0, 2, 5, 0.1)
    # The scheduler's own stream: one choice of donor among [2], then explore.
    mirror = random.Random(0)
    for _ in range(4):
        sample_space(SPACE, mirror)
    mirror.choice([2])
    assert event.new == explore(initial[2], SPACE, mirror, 0.25, [0.8, 1.2])
    assert event.old == initial[0]
    trial = sched.trials[0]
    assert trial.hyperparameters == event.new and trial.score == 0.1 and trial.step == 5
    assert trial.schedule == [(0, initial[2]), (5, event.new)]
    # A top trial never exploits.
    assert sched.report(1, 5, 0.9) == []


def test_async_ranks_a_trial_only_against_the_latest_scores():
    sched = scheduler(population=4, quantile_fraction=0.25)
    for _ in range(4):
        sched.next_trial()
    assert sched.report(0, 5, 0.90) == []
    assert sched.report(1, 5, 0.95) == []  # top of two: no copy
    sched.next_trial()  # trial 0 runs again and improves
    assert sched.report(0, 10, 0.99) == []
    # Against the latest scores {0: .99, 1: .95}, 0.93 is the bottom; against trial 0's
    # first score (.90) it would not be.
    events = sched.report(2, 5, 0.93)
    assert [(e.trial, e.donor, e.step) for e in events] == [(2, 0, 10)]


def test_synchronous_mode_waits_for_the_whole_population():
    sched = scheduler(population=4, synchronous=True, quantile_fraction=0.25)
    launched = [sched.next_trial().id for _ in range(4)]
    assert launched == [0, 1, 2, 3] and sched.next_trial() is None
    assert sched.report(0, 5, 0.9) == []
    assert sched.next_trial() is None  # trial 0 waits for generation 1 to be ranked
    assert sched.report(1, 5, 0.2) == []
    assert sched.report(2, 5, 0.5) == []
    events = sched.report(3, 5, 0.7)
    assert [(e.trial, e.donor) for e in events] == [(1, 0)]
    assert sched.generation == 1
    assert sorted(sched.next_trial().id for _ in range(4)) == [0, 1, 2, 3]


def test_more_trials_than_slots_advance_at_the_same_pace():
    sched = scheduler(population=5, quantile_fraction=0.0)
    steps = {i: 0 for i in range(5)}
    running = [sched.next_trial().id for _ in range(2)]  # two slots
    for _ in range(40):
        finished = running.pop(0)
        steps[finished] += 5
        sched.report(finished, steps[finished], 0.5)
        running.append(sched.next_trial().id)
        assert max(steps.values()) - min(steps.values()) <= 5
    assert not sched.events  # quantile 0: random search, never an exploit


def test_no_trial_is_replaced_before_its_burn_in():
    sched = scheduler(population=2, quantile_fraction=0.5, burn_in=10)
    sched.next_trial(), sched.next_trial()
    sched.report(0, 5, 0.9)
    assert sched.report(1, 5, 0.1) == []
    sched.next_trial()
    assert [e.trial for e in sched.report(1, 10, 0.1)] == [1]


def test_no_exploit_when_no_interval_is_left():
    sched = scheduler(population=2, quantile_fraction=0.5)
    sched.next_trial(), sched.next_trial()
    sched.report(0, 5, 0.9)
    assert sched.report(1, 5, 0.1, remaining=0) == []
    assert sched.trials[1].score == 0.1


def test_a_trial_is_replaced_only_if_it_will_train_again():
    def reported() -> PbtScheduler:
        sched = scheduler(population=3, quantile_fraction=0.34)
        for _ in range(3):
            sched.next_trial()
        sched.report(0, 5, 0.9)  # trial 2 still runs its first interval (step 0)
        return sched

    # Copying trial 0 puts trial 1 at step 5, behind trial 0 (step 5, id 0) in the queue;
    # trial 2 is running and does not count.
    assert reported().report(1, 5, 0.1, remaining=1) == []
    assert [e.trial for e in reported().report(1, 5, 0.1, remaining=2)] == [1]


def test_lineage_schedule_follows_the_donor_history():
    sched = scheduler(population=3, quantile_fraction=0.34, resample_probability=0.0)
    for _ in range(3):
        sched.next_trial()
    sched.report(0, 5, 0.9)
    sched.report(1, 5, 0.5)
    (first,) = sched.report(2, 5, 0.1)  # 2 copies 0 at step 5
    sched.next_trial(), sched.next_trial()
    sched.report(0, 10, 0.2)
    sched.report(2, 10, 0.95)
    sched.next_trial()
    (second,) = sched.report(1, 10, 0.05)  # bottom: 1 copies 2 (the top) at step 10
    assert (second.trial, second.donor, second.step) == (1, 2, 10)
    assert sched.trials[1].schedule == [
        (0, sched.trials[0].schedule[0][1]),
        (5, first.new),
        (10, second.new),
    ]


def test_state_round_trip_continues_with_the_same_decisions():
    a = scheduler(seed=4)
    for _ in range(4):
        a.next_trial()
    a.report(0, 5, 0.3), a.report(1, 5, 0.6)
    b = scheduler(seed=99)
    b.restore(a.state())
    for sched in (a, b):
        sched.next_trial()
    assert a.report(2, 5, 0.1) == b.report(2, 5, 0.1)
    assert [t.hyperparameters for t in a.trials] == [t.hyperparameters for t in b.trials]
    assert a.events == b.events


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_diverged_trial_never_wins(mode):
    sched = scheduler(mode=mode)
    for _ in range(2):
        sched.next_trial()
    sched.report(0, 5, float("nan"), remaining=0)
    sched.report(1, 5, 0.4, remaining=0)
    assert sched.best().id == 1


@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_respects_the_mode(mode):
    sched = scheduler(mode=mode)
    for _ in range(3):
        sched.next_trial()
    sched.report(0, 5, 0.3, remaining=0)
    sched.report(1, 5, 0.6, remaining=0)
    assert sched.best().id == (1 if mode == "max" else 0)
