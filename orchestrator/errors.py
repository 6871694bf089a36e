"""Errors meant for the person running a job: each names the problem and the fix.

The CLI prints these as one message and exits non-zero, with no traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class UserError(Exception):
    """A mistake the user can fix; the message says what and how."""


class ConfigError(UserError):
    """The run configuration is invalid; nothing has been started."""


class ClusterError(UserError):
    """Ray could not be reached or cannot host the run's workers."""


class RunFailed(Exception):
    """Workers kept dying past ``resources.max_failures``."""


def field_error(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: {value!r} is not allowed; {allowed}")


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


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
        shown = "" if problem["type"] in ("missing", "extra_forbidden") else f" (got {value!r})"
        if isinstance(value, dict):
            shown = ""
        lines.append(f"  {where}: {message}{shown}")
    return "\n".join(lines)
