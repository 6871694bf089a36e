"""Errors meant for the person running a job: each names the problem and the fix.

The CLI prints these as one message and exits non-zero, with no traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class UserError(Exception):
    """A mistake the user can fix; the message says what and how."""

    resumable = False
    """Whether ``--resume`` from the last checkpoint continues the run once it is fixed
    (a checkpoint the storage refused: yes), so the CLI prints the command that does."""


class ConfigError(UserError):
    """The run configuration is invalid; nothing has been started."""


class ClusterError(UserError):
    """Ray could not be reached or cannot host the run's workers."""


class RunFailed(Exception):
    """Workers kept dying past ``resources.max_failures``."""

    resumable = True
    """Whether ``--resume`` from the last checkpoint can go on (lost workers: yes), so the
    CLI prints the command that does."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C raises ``KeyboardInterrupt``: Python's default for SIGTERM
    ends the process at once, skipping the ``finally`` blocks that remove a half-written
    dataset and release Ray and the MLflow run."""


def field_error(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: {value!r} is not allowed; {allowed}")


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


SHOWN_INPUT = 200
"""Characters of a bad value an error echoes: enough to recognise it, never a whole file."""


def _short(value: Any) -> str:
    text = repr(value)
    if len(text) <= SHOWN_INPUT:
        return text
    return f"{text[:SHOWN_INPUT]}... ({len(text)} characters)"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the config:"]
    for problem in err.errors(include_url=False):
        where = _location(tuple(problem["loc"]))
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key; check its spelling (`unlocked strategies` lists the options)"
        elif problem["type"] == "missing":
            message = "required but missing"
        value = problem.get("input")
        shown = f" (got {_short(value)})"
        if problem["type"] in ("missing", "extra_forbidden") or isinstance(value, dict):
            shown = ""
        lines.append(f"  {where}: {message}{shown}")
    return "\n".join(lines)
