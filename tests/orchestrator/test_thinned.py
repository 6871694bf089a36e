"""The bounded per-step record behind ``RunResult.history`` and the published curves."""

from __future__ import annotations

import pytest

from orchestrator.thinned import ThinnedSteps


def filled(capacity: int, steps: range) -> ThinnedSteps[int]:
    record: ThinnedSteps[int] = ThinnedSteps(capacity)
    for step in steps:
        record.put(step, step * 10)
    return record


def test_every_step_is_kept_until_the_record_is_full():
    record = filled(8, range(1, 9))
    assert record.items() == [(s, s * 10) for s in range(1, 9)] and record.stride == 1


def test_a_long_run_keeps_an_even_grain_with_its_first_and_latest_step():
    record = filled(100, range(1, 100_001))
    steps = [s for s, _ in record.items()]
    assert len(steps) <= 100
    assert steps[0] == 1 and steps[-1] == 100_000
    inner = steps[1:-1]
    gaps = {b - a for a, b in zip(inner, inner[1:])}
    assert gaps == {record.stride} and record.stride == 1024


def test_the_latest_step_off_the_stride_is_replaced_by_the_next():
    record = filled(4, range(1, 12))  # stride 4 after two doublings
    assert record.stride == 4
    assert [s for s, _ in record.items()] == [1, 4, 8, 11]
    record.put(12, 120)
    assert [s for s, _ in record.items()] == [1, 4, 8, 12]
    record.put(13, 130)  # a fifth step: the stride doubles
    assert [s for s, _ in record.items()] == [1, 8, 13] and record.stride == 8


@pytest.mark.parametrize("capacity", [2, 3, 5])
def test_no_capacity_is_ever_exceeded(capacity):
    record: ThinnedSteps[int] = ThinnedSteps(capacity)
    for step in range(1, 2_000):
        record.put(step, step)
        assert len(record) <= capacity
        assert record.items()[0][0] == 1 and record.items()[-1][0] == step


def test_an_earlier_step_put_late_does_not_drop_the_latest():
    record = filled(4, range(1, 12))  # [1, 4, 8, 11], stride 4
    record.put(6, 60)  # a fifth step, earlier than the latest: the stride doubles
    assert [s for s, _ in record.items()] == [1, 8, 11] and record.stride == 8
    assert record.latest == 11 and record.items()[-1] == (11, 110)


def test_a_step_put_again_replaces_its_value():
    record = filled(8, range(1, 4))
    record.put(3, -1)
    assert record.items()[-1] == (3, -1) and len(record) == 3


def test_truncation_forgets_later_steps_and_the_replay_takes_their_place():
    record = filled(8, range(1, 7))
    record.truncate(3)
    assert [s for s, _ in record.items()] == [1, 2, 3] and record.latest == 3
    record.put(4, -4)
    assert record.items()[-1] == (4, -4)
    record.truncate(0)
    assert record.items() == [] and record.latest is None
    record.put(1, 7)
    assert record.items() == [(1, 7)]


def test_a_resumed_record_starts_at_its_first_step_and_keeps_it():
    record = filled(4, range(500, 520))
    assert record.items()[0] == (500, 5000)


def test_a_capacity_below_two_is_refused():
    with pytest.raises(ValueError, match="capacity: 1"):
        ThinnedSteps(1)
