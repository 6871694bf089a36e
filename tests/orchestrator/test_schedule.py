"""Replayed hyperparameter schedules: lookup by step, and files that are not schedules."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.errors import ConfigError
from orchestrator.schedule import SCHEDULE_FORMAT, HyperparameterSchedule, load_schedule


def test_values_hold_from_their_step_until_the_next():
    schedule = HyperparameterSchedule([(0, {"lr": 0.1}), (8, {"lr": 0.05}), (20, {"lr": 0.01})])
    assert [schedule.at(s)["lr"] for s in (0, 7, 8, 19, 20, 500)] == [
        0.1,
        0.1,
        0.05,
        0.05,
        0.01,
        0.01,
    ]


@pytest.mark.parametrize(
    ("entries", "message"),
    [([], "starts at step 0"), ([(4, {})], "starts at step 0"), ([(0, {}), (0, {})], "increase")],
)
def test_bad_schedules_are_rejected(entries, message):
    with pytest.raises(ValueError, match=message):
        HyperparameterSchedule(entries)
    with pytest.raises(ValueError, match="positive step"):
        HyperparameterSchedule([(0, {})], stop_at=0)


def test_a_schedule_file_round_trips(tmp_path):
    path = tmp_path / "s.yaml"
    document = {
        "format": SCHEDULE_FORMAT,
        "stop_at": 12,
        "schedule": [{"step": 0, "hyperparameters": {"lr": 0.1}}],
        "config": {"strategy": {"kind": "backprop"}},
    }
    path.write_text(yaml.safe_dump(document))
    schedule, config = load_schedule(path)
    assert schedule.at(3) == {"lr": 0.1} and config == document["config"]
    assert schedule.stop_at == 12


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [", "not valid YAML"),
        ("format: other\n", "not a hyperparameter schedule"),
        (f"format: {SCHEDULE_FORMAT}\nschedule: [{{step: 3}}]\n", "bad schedule"),
        (
            f"format: {SCHEDULE_FORMAT}\nschedule: [{{step: 0, hyperparameters: {{}}}}]\n",
            "no config section",
        ),
    ],
)
def test_files_that_are_not_schedules_say_so(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_schedule(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_schedule(tmp_path / "missing.yaml")


def test_a_replay_naming_an_unknown_hyperparameter_stops_before_ray(tmp_path):
    import unlocked

    path = tmp_path / "s.yaml"
    config = {
        "strategy": {"kind": "backprop"},
        "data": {"dataset": "digits"},
        "tracking": {"enabled": False},
        "checkpoint": {"root": str(tmp_path / "ckpt")},
    }
    schedule = [{"step": 0, "hyperparameters": {"momentum": 0.5}}]
    path.write_text(
        yaml.safe_dump({"format": SCHEDULE_FORMAT, "schedule": schedule, "config": config})
    )
    with pytest.raises(ConfigError, match=r"\['momentum'\] are not"):
        unlocked.run(replay_schedule=path)
    assert not (tmp_path / "ckpt").exists()
