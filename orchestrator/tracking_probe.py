"""Is the tracking server there? Asked once, in about two seconds, before Ray starts.

MLflow's own client retries a dead server for minutes (7 retries with exponential
backoff), after Ray has started and workers are reserved; a plain GET of the server's
``/health`` answers the same question at once.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError
from orchestrator.tracking_redact import redact_uri

if TYPE_CHECKING:
    from orchestrator.config import RunConfig

PROBE_TIMEOUT_S = 2.0
REMOTE_SCHEMES = ("http://", "https://")
OS_ERROR = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def _unreachable(uri: str, cause: str, field: str) -> ConfigError:
    return ConfigError(
        f"{field}: the MLflow server at {redact_uri(uri)} {cause}. Start it (e.g. "
        "`mlflow server --host 127.0.0.1 --port 5000`), or unset tracking.uri (and "
        "MLFLOW_TRACKING_URI) to log to a local SQLite file, or set tracking.enabled: false"
    )


def _reason(err: Exception) -> str:
    """The OS's words (``Connection refused``, ``Name or service not known``), not
    urllib3's three nested reprs."""
    found = OS_ERROR.search(str(err))
    return found[1].strip() if found else type(err).__name__


def check_reachable(
    uri: str, timeout_s: float = PROBE_TIMEOUT_S, field: str = "tracking.uri"
) -> None:
    """Raise a ConfigError naming ``field`` unless the server at ``uri`` answers.

    Only http(s) servers are probed: a SQLite file or a local folder is created on first
    use. An answer that refuses us (401, 403) still proves the server is up; credentials
    are MLflow's to check.
    """
    if not uri.startswith(REMOTE_SCHEMES):
        return
    import requests

    url = f"{uri.rstrip('/')}/health"
    try:
        answer = requests.get(url, timeout=timeout_s)
    except requests.Timeout:
        raise _unreachable(
            uri, field=field, cause=f"did not answer within {timeout_s:g} s"
        ) from None
    except requests.RequestException as err:
        raise _unreachable(uri, field=field, cause=f"cannot be reached ({_reason(err)})") from None
    if answer.status_code >= 500:
        raise _unreachable(
            uri, field=field, cause=f"is failing (GET /health answered {answer.status_code})"
        )
    if answer.status_code >= 400 and answer.status_code not in (401, 403):
        raise _unreachable(
            uri,
            field=field,
            cause=f"answered {answer.status_code} to GET /health, so it is no MLflow tracking "
            "server (or the URI lacks the server's path prefix)",
        )


def check_tracking(config: RunConfig) -> None:
    """The check ``validate`` and ``run`` make before anything starts."""
    from orchestrator.tracking import URI_ENV, default_tracking_uri

    if not config.tracking.enabled:
        return
    field = "tracking.uri" if config.tracking.uri else f"${URI_ENV} (tracking.uri is unset)"
    check_reachable(default_tracking_uri(config.tracking.uri), field=field)
