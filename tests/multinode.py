"""A Ray cluster of a head and worker nodes on this one machine, for multi-node tests.

Why ``ray.cluster_utils.Cluster`` and not `ray start`: Ray 2.60's `ray start --address`
refuses to add a worker node in single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
and with multi-node mode on it rewrites 127.0.0.1, both in ``--address`` and in
``--node-ip-address`` (``services.resolve_ip_for_localhost``), to the machine's outward
address, so every node's GCS, raylet and agents listen on 0.0.0.0 or that address. Ray's
own test cluster starts the same raylets, agents and workers a `ray start` does, but
keeps them on 127.0.0.1. Each node gets a custom resource named after it
(``{"node_a": 1}``) so a test can tell, and ask for, the node a worker is on.

Stopping a node kills its raylet and agents without grace (a lost machine) and then the
workers that raylet started, found as its child processes before it dies: nothing of
any other Ray on the machine is touched.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import free_port

HEAD = "head"

# The GCS declares a silent node dead after period x threshold: about 1.5 s here instead
# of Ray's default 15 s or more, so a test of node loss waits seconds, not minutes.
FAST_NODE_FAILURE = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


@dataclass
class LocalCluster:
    """The nodes of one cluster by name; ``address`` is its GCS, for ``resources.address``."""

    cluster: Any
    """The ``ray.cluster_utils.Cluster`` holding the nodes' processes."""
    cpus_per_node: int
    nodes: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, name: str, gpus: int = 0) -> None:
        """A worker node carrying ``{name: 1}`` (and ``gpus`` GPUs, declared, not real)."""
        self.nodes[name] = self.cluster.add_node(
            num_cpus=self.cpus_per_node,
            num_gpus=gpus,
            resources={name: 1},
            dashboard_agent_listen_port=free_port(),
            object_store_memory=80 * 2**20,
        )

    def stop_node(self, name: str) -> None:
        """Kill the node's raylet and agents at once, as a lost machine would, then the
        workers that raylet had started; the rest of the cluster goes on."""
        node = self.nodes.pop(name)
        raylet = node.all_processes["raylet"][0].process
        workers = psutil.Process(raylet.pid).children(recursive=True)
        self.cluster.remove_node(node, allow_graceful=False)
        for worker in workers:
            with suppress(psutil.NoSuchProcess):
                worker.kill()
        psutil.wait_procs(workers, timeout=30)

    def node_names(self) -> dict[str, str]:
        """Ray node id -> the name of the node it is, for the nodes alive now."""
        return {node.node_id: name for name, node in self.nodes.items()}


@contextmanager
def local_cluster(workers: dict[str, int], cpus_per_node: int = 2) -> Iterator[LocalCluster]:
    """A head (``{"head": 1}``) and one worker node per ``workers`` entry (name -> GPUs),
    each of ``cpus_per_node`` logical CPUs, torn down however the block exits. Every
    server listens on 127.0.0.1."""
    from ray._private.utils import get_ray_address_file, read_ray_address, write_ray_address
    from ray.cluster_utils import Cluster

    # Ray's socket paths must stay short: not under pytest's long tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # The test cluster records its address where `ray.init(address="auto")` and `ray
    # status` of every Ray on this machine look; the previous entry is put back.
    previous = read_ray_address()
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": cpus_per_node,
                "resources": {HEAD: 1},
                "include_dashboard": False,
                "dashboard_agent_listen_port": free_port(),
                "object_store_memory": 80 * 2**20,
                "temp_dir": temp_dir,
                "_system_config": FAST_NODE_FAILURE,
            },
        )
        if previous is None:
            Path(get_ray_address_file(None)).unlink(missing_ok=True)
        else:
            write_ray_address(previous)
        local = LocalCluster(cluster, cpus_per_node, {HEAD: cluster.head_node})
        for name, gpus in workers.items():
            local.add_node(name, gpus)
        cluster.wait_for_nodes()
        yield local
    finally:
        import ray

        ray.shutdown()  # a driver of this cluster in this process goes before its head
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
