"""Hyperparameter schedules: what PBT's winning trial did, replayed as a single run.

PBT writes the file (``pbt/winner_schedule.yaml`` in the run's MLflow artifacts); it holds
the single-run config of the winning trial's inner strategy and the hyperparameters its
lineage trained with, from which step on. ``unlocked run --replay-schedule FILE`` trains
that config once, switching hyperparameters at the recorded steps.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config_yaml import read_yaml_file
from orchestrator.errors import ConfigError

SCHEDULE_FORMAT = "unlocked-hyperparameter-schedule/1"


class HyperparameterSchedule:
    """Piecewise-constant values: ``entries[i]`` holds from its step to the next one; the
    run stops at ``stop_at`` (None: at ``stop.max_steps``)."""

    def __init__(
        self, entries: Sequence[tuple[int, Mapping[str, Any]]], stop_at: int | None = None
    ) -> None:
        if not entries or entries[0][0] != 0:
            raise ValueError("a schedule starts at step 0")
        steps = [s for s, _ in entries]
        if steps != sorted(set(steps)):
            raise ValueError(f"schedule steps must increase strictly (got {steps})")
        if stop_at is not None and stop_at <= 0:
            raise ValueError(f"stop_at must be a positive step (got {stop_at})")
        self.steps = steps
        self.values = [dict(v) for _, v in entries]
        self.stop_at = stop_at

    def at(self, step: int) -> dict[str, Any]:
        """The values in force for the step after ``step`` steps have been taken."""
        return self.values[bisect.bisect_right(self.steps, step) - 1]


def load_schedule(path: str | Path) -> tuple[HyperparameterSchedule, dict[str, Any]]:
    """Read a schedule file: (the schedule, the raw run config it replays)."""
    file = Path(path)
    document = read_yaml_file(file, "--replay-schedule")
    if not isinstance(document, dict) or document.get("format") != SCHEDULE_FORMAT:
        raise ConfigError(
            f"--replay-schedule {file}: not a hyperparameter schedule (expected "
            f"format: {SCHEDULE_FORMAT}); use the pbt/winner_schedule.yaml a PBT run logged"
        )
    try:
        entries = [(int(e["step"]), dict(e["hyperparameters"])) for e in document["schedule"]]
        stop_at = document.get("stop_at")
        schedule = HyperparameterSchedule(entries, None if stop_at is None else int(stop_at))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"--replay-schedule {file}: bad schedule: {err}") from None
    config = document.get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"--replay-schedule {file}: the file has no config section")
    return schedule, config


def check_schedule_names(schedule: HyperparameterSchedule, known: Sequence[str], file: str) -> None:
    """Every hyperparameter the schedule sets is one the run's strategy has
    (``StrategyConfig.hyperparameter_names``): checked with the config, before Ray starts,
    instead of when the first value is applied inside the run."""
    named = {name for values in schedule.values for name in values}
    unknown = sorted(named - set(known))
    if unknown:
        raise ConfigError(
            f"--replay-schedule {file}: hyperparameters {unknown} are not ones the config's "
            f"strategy has; it has {sorted(known)}. Use the schedule with the config it was "
            "written with (its config section), without --set overrides that change the "
            "strategy"
        )
