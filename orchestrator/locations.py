"""Where a run keeps what must outlive it, and whether it runs as a submitted Ray job.

A job submitted with `ray job submit --working-dir .` runs in a temporary copy of that
directory, so the relative defaults (``mlruns.db``, ``.unlocked/checkpoints``,
``.unlocked/datasets``) vanish with the job. A cluster names durable places once, in its
nodes' environment (the Helm chart, ``deploy/local-cluster.sh``), and every config that
leaves a location unset picks them up: examples run unchanged on a laptop and a cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestrator.data.files import is_uri

CHECKPOINT_ROOT_ENV = "UNLOCKED_CHECKPOINT_ROOT"
DATA_ROOT_ENV = "UNLOCKED_DATA_ROOT"
# Set by Ray's job supervisor in the environment of a submitted job's entrypoint.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def checkpoint_root() -> str:
    return os.environ.get(CHECKPOINT_ROOT_ENV) or ".unlocked/checkpoints"


def data_root() -> str:
    return os.environ.get(DATA_ROOT_ENV) or ".unlocked/datasets"


def job_submission_id() -> str | None:
    """The `ray job submit` id of this process's job, or None outside a submitted job."""
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    return metadata.get("job_submission_id")


def ephemeral_locations(locations: dict[str, str], working_dir: Path) -> list[str]:
    """The named locations that lie inside ``working_dir`` (a job's temporary copy).

    A SQLite or ``file:`` URI names a local file too; any other URI is remote storage.
    """
    inside = []
    for name, location in locations.items():
        path = location.removeprefix("sqlite:///").removeprefix("file://").removeprefix("file:")
        if is_uri(path):
            continue
        if (working_dir / path).resolve().is_relative_to(working_dir.resolve()):
            inside.append(f"{name}={location}")
    return inside
