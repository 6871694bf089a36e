"""Ray connection and resource reservation, with errors that say what to do.

No address: a local Ray started by this process (or the cluster in $RAY_ADDRESS, as
`ray job submit` sets it). 'auto': the cluster this machine belongs to. 'host:port' or
'ray://host:port': that cluster, probed first so a typo fails in seconds, not minutes.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from orchestrator.errors import ClusterError
from orchestrator.progress import LOG_FORMAT

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from orchestrator.config import ResourcesConfig

log = logging.getLogger(__name__)

TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _host_port(address: str) -> tuple[str, int] | None:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.hostname and parsed.port:
        return parsed.hostname, parsed.port
    return None


def probe(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast when a given host:port does not answer at all."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterError(
            f"resources.address: cannot reach Ray at {address!r} ({err.strerror or err}); "
            "check the head node is up (`ray status`) and the address is host:port of its GCS "
            "(default port 6379), or leave resources.address unset to run on a local Ray"
        ) from None


def _verbose() -> bool:
    """Whether the root logger shows INFO (`unlocked --verbose`, or a script's own logging
    setup): then Ray's driver logs at INFO too, else at WARNING."""
    return logging.getLogger().isEnabledFor(logging.INFO)


def _ray_logging() -> dict[str, Any]:
    """Ray's driver logger in the run's format, at the level ``_verbose`` says."""
    level = logging.INFO if _verbose() else logging.WARNING
    return {"logging_level": level, "logging_format": LOG_FORMAT}


def connect(resources: ResourcesConfig, cpus_needed: float) -> tuple[str, bool]:
    """Connect to (or start) Ray; return its address and whether this process started it."""
    import ray  # here, not at the top: `unlocked validate` probes addresses without Ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address, False
    address = resources.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        # The embedded Ray is one machine: Ray's single-machine mode binds every server to
        # loopback, so nothing outside this machine can reach it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # A new local Ray turns token authentication on and warns so at every start. Naming
        # the mode (RAY_AUTH_MODE=token) would silence it only before `import ray`, which
        # reads it once; the warning says nothing a local run can act on, so it waits for
        # --verbose like Ray's INFO lines.
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(
            logging.NOTSET if _verbose() else logging.ERROR
        )
        # A laptop may have fewer cores than workers: oversubscribe logically, on purpose.
        cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
        ray.init(num_cpus=cpus, include_dashboard=False, **_ray_logging())
        return ray.get_runtime_context().gcs_address, True
    probe(address)
    try:
        ray.init(address=address, **_ray_logging())
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(
            f"resources.address: could not connect to Ray at {address!r}: {err}. "
            "Start a cluster with `ray start --head`, or leave the address unset for a local Ray"
        ) from None
    return address, False


def reserve(bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> PlacementGroup:
    """One bundle per worker, reserved up front so a run starts whole or not at all."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(
            f"resources: the run needs {len(bundles)} workers of {bundles[0]} "
            f"({strategy}) but the cluster offers {ray.available_resources()}; lower "
            "resources.cpus_per_worker / gpus_per_worker, use fewer workers, or add nodes"
        )
    return group
