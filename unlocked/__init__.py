"""unlocked's Python API: train from a notebook or a script as the CLI does.

    import unlocked

    result = unlocked.run("examples/pipeline.yaml", overrides=["stop.max_steps=20"])
    print(result.metrics["eval/accuracy"], result.mlflow_run_id, result.checkpoint_dir)

``run`` takes a YAML path, a mapping (the YAML's content as Python) or a ``RunConfig``;
``callbacks`` are ``Callback`` subclasses called as the run goes (``on_step_end``,
``on_checkpoint``, ``on_failure``, ``on_finish``). Mistakes in what you give raise a
``UserError`` (a ``ConfigError`` for the config) whose message names the problem and the
fix, before anything starts. Importing this package loads neither Ray nor torch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.callbacks import Callback
from orchestrator.config import RunConfig, config_from_mapping
from orchestrator.config import load_config as _load_file
from orchestrator.errors import ConfigError, RunFailed, UserError
from orchestrator.results import RunResult

__all__ = [
    "Callback",
    "ConfigError",
    "RunConfig",
    "RunFailed",
    "RunResult",
    "UserError",
    "load_config",
    "run",
]

ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | RunConfig


def load_config(source: ConfigSource, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated run config from a YAML path, a mapping or a config object, with
    ``overrides`` (``"stop.max_steps=50"``, values parsed as YAML) applied. A run without
    ``run.name`` is named after its file, or else after its strategy."""
    if isinstance(source, RunConfig):
        if not overrides and source.run.name:
            return source
        # Python mode: a custom model given as a callable stays the callable (JSON mode
        # would write it as its import path, which a function from __main__ cannot be).
        source = source.model_dump(exclude_unset=True)
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
        strategy = raw.get("strategy")
        kind = strategy.get("kind") if isinstance(strategy, Mapping) else None
        name = kind if isinstance(kind, str) else "run"
        return config_from_mapping(raw, list(overrides), source="<config>", default_name=name)
    if isinstance(source, (str, os.PathLike)):
        return _load_file(source, list(overrides))
    raise ConfigError(
        f"unlocked.load_config: got a {type(source).__name__}; give a YAML path, a mapping "
        "of config sections, or a RunConfig"
    )


def run(
    config: ConfigSource | None = None,
    *,
    overrides: Sequence[str] = (),
    resume: bool | str = False,
    callbacks: Sequence[Callback] = (),
    replay_schedule: str | os.PathLike[str] | None = None,
) -> RunResult:
    """Train the run ``config`` describes and return its result.

    ``resume=True`` continues the run of that name from the newest attempt that holds a
    complete checkpoint; ``resume="ATTEMPT"`` from that attempt folder (the last part of
    a result's ``checkpoint_dir``), even where a newer attempt of the same name exists.
    ``replay_schedule`` (instead of ``config``) trains the single run a PBT winner's
    schedule file describes (``pbt/winner_schedule.yaml``), switching hyperparameters at
    its steps. Ray is started for the run and stopped after it, unless it was already
    initialised (then the run uses that Ray and leaves it running).
    """
    from orchestrator.controller import Controller
    from orchestrator.schedule import check_schedule_names, load_schedule

    if (config is None) == (replay_schedule is None):
        raise UserError(
            "unlocked.run: give a config, or replay_schedule (a PBT schedule file, which holds "
            "its own config), not both and not neither"
        )
    schedule = None
    if replay_schedule is not None:
        schedule, raw = load_schedule(replay_schedule)
        loaded = config_from_mapping(raw, list(overrides), source=str(replay_schedule))
        check_schedule_names(schedule, loaded.strategy.hyperparameter_names(), str(replay_schedule))
    else:
        loaded = load_config(config, overrides)
    return Controller(loaded, resume=resume, callbacks=callbacks, schedule=schedule).run()
