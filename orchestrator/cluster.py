"""Ray connection and resource reservation, with errors that say what to do.

No address: a local Ray started by this process (or the cluster in $RAY_ADDRESS, as
`ray job submit` sets it). 'auto': the cluster this machine belongs to. 'host:port' or
'ray://host:port': that cluster, probed first so a typo fails in seconds, not minutes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from orchestrator.errors import ClusterError
from orchestrator.listeners import is_loopback
from orchestrator.progress import LOG_FORMAT
from orchestrator.results import WorkerPlacement

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from orchestrator.config import ResourcesConfig

log = logging.getLogger(__name__)

TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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


def single_machine_mode() -> None:
    """Make the Ray this process starts next listen on loopback only.

    Ray derives every listener from one node IP: GCS, raylet, object manager, the driver's
    and workers' gRPC servers, the dashboard and runtime-env agents bind to it, or to
    every interface when it is not loopback. `ray.init(_node_ip_address="127.0.0.1")`
    does not help: Ray rewrites a loopback address to the machine's outward one
    (``services.resolve_ip_for_localhost``) unless its single-machine mode is on. That
    mode is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray reads once, at
    ``import ray``, into ``ray_constants.ENABLE_RAY_CLUSTER``, and which every process
    Ray starts reads again at its own import. So both are set here: the variable for the
    children, the constant for this process, which has imported Ray already (a CLI run,
    a notebook, a test that imported Ray first), and from which ``ray.init`` asks the
    node IP at call time.
    """
    from ray._private import ray_constants

    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def require_loopback() -> None:
    """Refuse to run on an embedded Ray that another machine could reach: should a Ray
    upgrade stop honouring ``single_machine_mode``, the run stops here, not exposed."""
    import ray

    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        ray.shutdown()
        raise ClusterError(
            f"the local Ray started on node IP {node_ip}, not on loopback, so its servers "
            f"would accept connections from the network; set {SINGLE_MACHINE_ENV}=0 "
            "before starting `unlocked`, or run on a cluster you secured yourself by "
            "setting resources.address"
        )


@contextmanager
def _sigterm_kept() -> Iterator[None]:
    """``ray.init`` replaces SIGTERM's handler with a bare ``sys.exit(15)`` and never gives
    the old one back; the CLI's (exit 143, cleanup that runs) must outlive it."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def connect(resources: ResourcesConfig, cpus_needed: float) -> tuple[str, bool]:
    """Connect to (or start) Ray; return its address and whether this process started it."""
    import ray  # here, not at the top: `unlocked validate` probes addresses without Ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address, False
    address = resources.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        single_machine_mode()
        # A new local Ray turns token authentication on and warns so at every start. Naming
        # the mode (RAY_AUTH_MODE=token) would silence it only before `import ray`, which
        # reads it once; the warning says nothing a local run can act on, so it waits for
        # --verbose like Ray's INFO lines.
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(
            logging.NOTSET if _verbose() else logging.ERROR
        )
        # A laptop may have fewer cores than workers: oversubscribe logically, on purpose.
        cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
        with _sigterm_kept():
            ray.init(num_cpus=cpus, include_dashboard=False, **_ray_logging())
        require_loopback()
        return ray.get_runtime_context().gcs_address, True
    probe(address)
    try:
        with _sigterm_kept():
            ray.init(address=address, **_ray_logging())
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(
            f"resources.address: could not connect to Ray at {address!r}: {err}. "
            "Start a cluster with `ray start --head`, or leave the address unset for a local Ray"
        ) from None
    return address, False


@dataclass(frozen=True)
class NodeResources:
    """One live node as a placement error shows it: what it has and what is free."""

    node_id: str
    ip: str
    total: dict[str, float]
    free: dict[str, float]


def _shown(resource: str) -> bool:
    """CPU, GPU and custom resources; not memory, the node's own marker, or the resources
    Ray derives from placement groups (``CPU_group_<id>``)."""
    return (
        resource not in ("memory", "object_store_memory")
        and not resource.startswith(("node:", "accelerator_type:"))
        and "_group_" not in resource
    )


def _amount(value: float) -> str:
    return f"{value:g}"


def describe_node(node: NodeResources) -> str:
    """``127.0.0.1 (node 1a2b3c4d): CPU 1/2 free, GPU 0/0 free, node_a 1/1 free``."""
    names = ["CPU", "GPU", *sorted(r for r in node.total if _shown(r) and r not in ("CPU", "GPU"))]
    parts = [
        f"{r} {_amount(node.free.get(r, 0.0))}/{_amount(node.total.get(r, 0.0))} free"
        for r in names
    ]
    return f"{node.ip} (node {node.node_id[:8]}): " + ", ".join(parts)


def unfit_message(
    bundles: list[dict[str, float]],
    strategy: str,
    nodes: list[NodeResources],
    waited_s: float,
    when: str = "",
) -> str:
    """Why a placement group was not placed: what it asked, what each node has, the fix."""
    asked = {k: float(v) for k, v in bundles[0].items()}
    fixes = [
        "lower resources.cpus_per_worker / gpus_per_worker",
        "use fewer workers",
        "add nodes",
    ]
    if strategy == "STRICT_SPREAD" and len(bundles) > len(nodes):
        fixes.insert(
            0,
            "set resources.placement_strategy: SPREAD (STRICT_SPREAD puts each "
            f"worker on its own node: {len(bundles)} workers need {len(bundles)} nodes)",
        )
    elif strategy == "STRICT_PACK":
        fixes.insert(
            0, "set resources.placement_strategy: PACK (STRICT_PACK puts every worker on one node)"
        )
    shown = "; ".join(describe_node(n) for n in nodes) or "no live node"
    return (
        f"resources: {when}the run needs {len(bundles)} workers of {asked} "
        f"placed {strategy}, and the cluster could not fit them within "
        f"resources.placement_timeout_s={_amount(waited_s)} s; its {len(nodes)} node(s): "
        f"{shown}. Fix: " + ", or ".join(fixes)
    )


def cluster_nodes() -> list[NodeResources]:
    """The live nodes of the connected cluster, with their total and free resources."""
    import ray
    from ray._private import state

    total = state.total_resources_per_node()
    free = state.available_resources_per_node()
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    return [
        NodeResources(
            node_id, ips.get(node_id, "?"), dict(total[node_id]), dict(free.get(node_id, {}))
        )
        for node_id in sorted(total, key=lambda i: (ips.get(i, "?"), i))
    ]


def reserve(bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> PlacementGroup:
    """One bundle per worker, reserved up front so a run starts whole or not at all."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(unfit_message(bundles, strategy, cluster_nodes(), timeout_s))
    return group


def bundle_nodes(group: PlacementGroup) -> dict[int, str]:
    """Bundle index -> the id of the node holding it now."""
    from ray.util.placement_group import placement_group_table

    return dict(placement_group_table(group)["bundles_to_node_id"])


def await_replacement(group: PlacementGroup, lost: list[str], timeout_s: float, where: str) -> None:
    """After a loss, wait until the GCS has buried the lost workers (``lost``: actor ids)
    and the group stands whole again on live nodes: Ray re-places the bundles of a dead
    node on the nodes left when they fit. Waiting first for the deaths keeps a node that
    is gone but not yet declared dead from passing for a home; never longer than
    ``timeout_s`` in all, then a ``ClusterError`` that says what is missing."""
    import ray
    from ray._private import state
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + timeout_s
    while True:
        table = placement_group_table(group)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        buried = all(state.actors(actor_id).get("State") == "DEAD" for actor_id in lost)
        if (
            buried
            and table["state"] == "CREATED"
            and set(table["bundles_to_node_id"].values()) <= alive
        ):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    bundles = [table["bundles"][i] for i in sorted(table["bundles"])]
    raise ClusterError(
        unfit_message(
            bundles,
            table["strategy"],
            cluster_nodes(),
            timeout_s,
            f"after a worker loss at {where}, ",
        )
    )


def locate_workers(group: PlacementGroup, bundles: dict[str, int]) -> dict[str, WorkerPlacement]:
    """Where each worker (name -> bundle index) runs now: its bundle's node."""
    import ray

    nodes = bundle_nodes(group)
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return {
        worker: WorkerPlacement(nodes[index], ips.get(nodes[index], "?"), index)
        for worker, index in sorted(bundles.items())
    }


def _cuda_on_this_worker() -> tuple[bool, str]:
    """Run on a node with the worker's GPU share: whether torch can use a GPU here."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    build = torch.version.cuda or "none (a CPU-only build)"
    return (
        torch.cuda.is_available(),
        f"torch {torch.__version__}, CUDA {build}, CUDA_VISIBLE_DEVICES={visible}",
    )


def check_cuda(group: PlacementGroup, gpus_per_worker: float) -> None:
    """A worker given a GPU share trains on ``cuda``: refuse, before any worker starts,
    a node where torch cannot see one, naming the node and torch's build, instead of a
    torch traceback in every worker. One probe per node of the group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    first_bundle = {
        node: index for index, node in sorted(bundle_nodes(group).items(), reverse=True)
    }
    probe_cuda = ray.remote(_cuda_on_this_worker)
    answers = ray.get(
        [
            probe_cuda.options(
                num_cpus=0,
                num_gpus=gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=index
                ),
            ).remote()
            for index in first_bundle.values()
        ]
    )
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    for node, (available, torch_build) in zip(first_bundle, answers):
        if not available:
            raise ClusterError(
                f"resources.gpus_per_worker: {gpus_per_worker:g} gives each worker a GPU "
                f"share, but torch on node {ips.get(node, '?')} ({node[:8]}) sees no CUDA "
                f"device ({torch_build}); install a CUDA build of torch on the GPU nodes, "
                "or set resources.gpus_per_worker: 0 to train on CPUs"
            )
