"""Runs on a Ray cluster through Ray's Job SDK: `unlocked submit | status | logs | stop`.

`unlocked submit CONFIG` is `ray job submit --runtime-env deploy/runtime_env.yaml --
python -m orchestrator run CONFIG` with the config checked here first, so a typo fails
on the laptop instead of minutes later on the cluster. The runtime environment is
declared once, in ``deploy/runtime_env.yaml``, for both paths.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.errors import ClusterError, UserError

DEFAULT_RUNTIME_ENV = Path("deploy/runtime_env.yaml")
# Exit codes of a followed job: 0 only when it succeeded (the same as `ray job submit`).
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
_ADDRESS_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def job_address(address: str | None) -> str:
    """The dashboard's HTTP address: --address, else $RAY_ADDRESS (Ray's own convention)."""
    chosen = address or os.environ.get("RAY_ADDRESS")
    if not chosen:
        raise UserError(
            "no Ray cluster given: pass --address http://HEAD:8265 (the dashboard's address) "
            "or set RAY_ADDRESS; `bash deploy/local-cluster.sh up` starts one on this machine"
        )
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    if not chosen.startswith(("http://", "https://")):
        raise UserError(
            f"--address {chosen!r}: jobs are submitted to the dashboard's HTTP address, "
            "e.g. http://HEAD:8265, not to the GCS (ray://, port 6379)"
        )
    return chosen


def load_runtime_env(path: Path, env: list[str]) -> dict[str, Any]:
    """The declared runtime environment plus ``KEY=VALUE`` additions, checked by Ray itself."""
    from ray.runtime_env import RuntimeEnv

    from orchestrator.config import read_yaml_mapping

    shape = "a mapping (working_dir, excludes, env_vars, ...)"
    raw = read_yaml_mapping(path, "--runtime-env", shape, UserError)
    env_vars = dict(raw.get("env_vars") or {})
    for assignment in env:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise UserError(f"--env {assignment!r}: expected KEY=VALUE, e.g. --env FOO=bar")
        env_vars[key] = value
    if env_vars:
        raw["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    try:
        RuntimeEnv(**raw)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: not a valid Ray runtime environment: {err}") from None
    return raw


def entrypoint(config: Path, working_dir: Path, overrides: list[str]) -> str:
    """The job's command, naming the config by its path inside the uploaded working dir."""
    try:
        relative = config.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise UserError(
            f"{config}: the config must lie inside the working directory {str(working_dir)!r} "
            "that is uploaded with the job; move it there or set working_dir in the runtime env"
        ) from None
    words = ["python", "-m", "orchestrator", "run", relative.as_posix()]
    for assignment in overrides:
        words += ["--set", assignment]
    return shlex.join(words)


@contextmanager
def _cluster_errors(address: str) -> Iterator[None]:
    """Turn the Job SDK's connection and auth failures into one message with the fix."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except ConnectionError as err:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address} ({err}); check the head is up "
            "(`ray status` on it) and that --address is its dashboard (port 8265)"
        ) from None
    except AuthenticationError:
        raise ClusterError(
            f"the Ray cluster at {address} refused the request: it uses token authentication "
            "and this shell has no token, or the wrong one; export RAY_AUTH_MODE=token "
            "RAY_AUTH_TOKEN=<the cluster's token> (`ray get-auth-token` on the head prints it)"
        ) from None
    except RuntimeError as err:
        if "does not exist" in str(err):
            raise UserError(
                f"no job of that id on {address}; `ray job list --address {address}` lists them"
            ) from None
        raise


@contextmanager
def _job_client(address: str | None) -> Iterator[Any]:
    """A Job SDK client of the cluster at ``address``, its failures turned into messages.

    Ray's client lets $RAY_ADDRESS (and $RAY_API_SERVER_ADDRESS) override the address it is
    given; here an explicit --address wins, as a user typing it expects.
    """
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    with _cluster_errors(url):
        hidden = {k: os.environ.pop(k) for k in _ADDRESS_VARIABLES if k in os.environ}
        try:
            client = JobSubmissionClient(url)
        finally:
            os.environ.update(hidden)
        yield client


def submit(
    config_path: str,
    overrides: list[str],
    address: str | None,
    runtime_env_path: str | None,
    env: list[str],
    submission_id: str | None,
) -> tuple[str, str]:
    """Check the config, then submit it; return (the cluster's address, the job id)."""
    from orchestrator.config import load_config

    load_config(config_path, overrides)  # a bad config starts nothing, not even an upload
    runtime_env = load_runtime_env(Path(runtime_env_path or DEFAULT_RUNTIME_ENV), env)
    working_dir = Path(runtime_env.setdefault("working_dir", "."))
    command = entrypoint(Path(config_path), working_dir, overrides)
    url = job_address(address)
    with _job_client(url) as client:
        job_id = client.submit_job(
            entrypoint=command, runtime_env=runtime_env, submission_id=submission_id
        )
    return url, job_id


def status(job_id: str, address: str | None) -> dict[str, str]:
    with _job_client(address) as client:
        info = client.get_job_info(job_id)
    return {
        "status": str(info.status),
        "message": info.message or "",
        "entrypoint": info.entrypoint,
    }


def logs(job_id: str, address: str | None) -> str:
    """The job's log so far."""
    with _job_client(address) as client:
        return client.get_job_logs(job_id)


def follow(job_id: str, address: str | None) -> str:
    """Stream the job's log to stdout until it ends; return its final status."""
    with _job_client(address) as client:

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        asyncio.run(tail())
        return str(client.get_job_status(job_id))


def stop(job_id: str, address: str | None) -> bool:
    with _job_client(address) as client:
        return client.stop_job(job_id)
