"""Several nodes: a head and two worker nodes on this machine (tests/multinode.py).

Workers land where the placement strategy says, a lost node's workers are rebuilt on
the nodes left and restored from the checkpoint, a group that cannot be placed fails
within its timeout saying what was asked and what is there, fractional GPUs share a
device, and ``workers: auto`` sizes EGGROLL from the cluster.

This process is the driver of the test cluster: a session-wide local Ray (conftest's
``ray_local``) that an earlier test started here is shut down for this module and
started again afterwards, as conftest starts it, since one process holds one Ray
connection. Running each run in a subprocess instead would cost an interpreter, torch
and Ray start per run, and a node could not be stopped at an exact step.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import unlocked
from orchestrator.errors import ClusterError
from tests.conftest import on_step, small_config
from tests.multinode import HEAD, LocalCluster, local_cluster

pytestmark = pytest.mark.slow

WORKER_NODES = {"node_a": 0, "node_b": 1}
"""Worker nodes and their GPUs (declared to Ray, not real: node_b has one to share)."""


@pytest.fixture(scope="module")
def cluster_module() -> Iterator[LocalCluster]:
    session_cpus = ray.cluster_resources().get("CPU") if ray.is_initialized() else None
    ray.shutdown()
    try:
        with local_cluster(WORKER_NODES, cpus_per_node=2) as cluster:
            yield cluster
    finally:
        ray.shutdown()
        if session_cpus is not None:  # as conftest's ray_local started it
            ray.init(num_cpus=int(session_cpus), include_dashboard=False, logging_level="ERROR")


@pytest.fixture
def cluster(cluster_module: LocalCluster) -> LocalCluster:
    """The cluster whole (a node an earlier test stopped is back), this process its driver."""
    for name, gpus in WORKER_NODES.items():
        if name not in cluster_module.nodes:
            cluster_module.add_node(name, gpus)
    if not ray.is_initialized():
        ray.init(address=cluster_module.address, logging_level="ERROR")
    # Ray frees an earlier test's group a moment after its removal: start from all free.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
    return cluster_module


def pipeline_config(tmp_path: Path, dataset_root: Path, address: str, **resources: Any) -> dict:
    return small_config(
        tmp_path,
        dataset_root,
        strategy={"blocks": 4, "batches_per_step": 2, "max_in_flight": 2},
        model={"hidden": [16, 16, 16, 16]},
        resources={"address": address, "placement_timeout_s": 20, **resources},
        tracking={"enabled": False},
        stop={"max_steps": 2},
        eval={"every": 100},
    )


def eggroll_config(tmp_path: Path, address: str, **strategy: Any) -> dict:
    return {
        "run": {"name": "es-nodes", "seed": 0},
        "strategy": {
            "kind": "eggroll",
            "population": 8,
            "workers": 3,
            "checksum_every": 2,
            "task": {
                "kind": "gym",
                "env": "CartPole-v1",
                "hidden": [8],
                "max_episode_steps": 20,
                "eval_episodes": 1,
            },
            **strategy,
        },
        "resources": {"address": address, "placement_timeout_s": 20},
        "tracking": {"enabled": False},
        "checkpoint": {"root": str(tmp_path / "ckpt"), "every": 2},
        "stop": {"max_steps": 2},
        "eval": {"every": 100},
    }


def with_resources(raw: dict, **resources: Any) -> dict:
    return {**raw, "resources": {**raw["resources"], **resources}}


def nodes_of(result: unlocked.RunResult, cluster: LocalCluster) -> dict[str, str]:
    """Worker -> the name of the node it ran on."""
    names = cluster.node_names()
    return {worker: names[p.node_id] for worker, p in result.placement.items()}


# -- placement ---------------------------------------------------------------------------
def test_pack_puts_a_pipeline_of_small_blocks_on_one_node(cluster, tmp_path, dataset_root):
    raw = pipeline_config(
        tmp_path, dataset_root, cluster.address, placement_strategy="PACK", cpus_per_worker=0.5
    )
    result = unlocked.run(raw)
    placed = nodes_of(result, cluster)
    assert sorted(placed) == [f"block-{k}" for k in range(4)]
    assert len(set(placed.values())) == 1, placed
    assert {p.node_ip for p in result.placement.values()} == {"127.0.0.1"}


def test_pack_puts_eggroll_workers_on_one_node(cluster, tmp_path):
    raw = with_resources(
        eggroll_config(tmp_path, cluster.address), placement_strategy="PACK", cpus_per_worker=0.5
    )
    raw["stop"] = {"max_steps": 1}
    placed = nodes_of(unlocked.run(raw), cluster)
    assert sorted(placed) == ["population-0", "population-1", "population-2"]
    assert len(set(placed.values())) == 1, placed


def test_strict_spread_over_more_workers_than_nodes_fails_in_time(cluster, tmp_path, dataset_root):
    raw = pipeline_config(
        tmp_path,
        dataset_root,
        cluster.address,
        placement_strategy="STRICT_SPREAD",
        placement_timeout_s=3,
    )
    started = time.monotonic()
    with pytest.raises(ClusterError) as refused:
        unlocked.run(raw)
    assert time.monotonic() - started < 30
    message = str(refused.value)
    assert "needs 4 workers of {'CPU': 1.0} placed STRICT_SPREAD" in message
    assert "placement_timeout_s=3 s; its 3 node(s)" in message
    assert message.count("127.0.0.1 (node ") == 3
    assert "node_a 1/1 free" in message and "GPU 1/1 free" in message
    assert "set resources.placement_strategy: SPREAD" in message


# -- losing a node ---------------------------------------------------------------------
def stop_node_at(cluster: LocalCluster, step: int, seen: dict[str, Any]) -> Any:
    """A callback that records where the workers are at ``step`` and stops, once, the
    worker node holding the most of them."""

    def hook(run: Any, at: int, metrics: dict) -> None:
        if at != step or "stopped" in seen:
            return
        names = cluster.node_names()
        seen["before"] = {w: names[p.node_id] for w, p in run.placement.items()}
        hosts = Counter(seen["before"].values())
        seen["stopped"] = next(n for n, _ in hosts.most_common() if n != HEAD)
        cluster.stop_node(seen["stopped"])

    return on_step(hook)


def test_a_spread_pipeline_survives_losing_a_node(cluster, tmp_path, dataset_root):
    """SPREAD lays the blocks over the nodes; a lost node's blocks are rebuilt on the
    nodes left, the run replays from its step-2 checkpoint, and MLflow's placement.json
    says where the blocks ended."""
    raw = pipeline_config(
        tmp_path, dataset_root, cluster.address, placement_strategy="SPREAD", cpus_per_worker=0.5
    )
    raw["tracking"] = {
        "uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "experiment": "tests",
        "system_metrics": False,
    }
    raw["stop"] = {"max_steps": 5}
    seen: dict[str, Any] = {}
    result = unlocked.run(raw, callbacks=[stop_node_at(cluster, 3, seen)])
    assert len(set(seen["before"].values())) >= 2, seen  # PACK would fill one node
    assert result.failures >= 1 and result.step == 5
    steps = [s for s, _ in result.history]
    assert steps[:3] == [1, 2, 3] and steps[-3:] == [3, 4, 5]
    placed = nodes_of(result, cluster)
    assert sorted(placed) == [f"block-{k}" for k in range(4)]
    assert seen["stopped"] not in placed.values()
    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    path = client.download_artifacts(result.mlflow_run_id, "placement.json", str(tmp_path))
    logged = json.loads(Path(path).read_text())
    assert {w: p["node_id"] for w, p in logged.items()} == {
        w: p.node_id for w, p in result.placement.items()
    }


def test_eggroll_survives_losing_a_node(cluster, tmp_path):
    raw = with_resources(eggroll_config(tmp_path, cluster.address), placement_strategy="SPREAD")
    raw["stop"] = {"max_steps": 4}
    seen: dict[str, Any] = {}
    result = unlocked.run(raw, callbacks=[stop_node_at(cluster, 3, seen)])
    assert len(set(seen["before"].values())) == 3, seen
    assert result.failures >= 1 and result.step == 4
    assert [s for s, _ in result.history][-2:] == [3, 4]
    assert seen["stopped"] not in nodes_of(result, cluster).values()


def test_eggroll_auto_strict_spread_one_per_node_cannot_lose_one(cluster, tmp_path):
    """`workers: auto` at 2 CPUs a worker fits three workers, STRICT_SPREAD one per node;
    once a node is lost the group cannot stand again and the run says so in time."""
    raw = with_resources(
        eggroll_config(tmp_path, cluster.address, workers="auto"),
        placement_strategy="STRICT_SPREAD",
        cpus_per_worker=2,
        placement_timeout_s=4,
    )
    raw["stop"] = {"max_steps": 4}
    seen: dict[str, Any] = {}
    started = time.monotonic()
    with pytest.raises(ClusterError) as refused:
        unlocked.run(raw, callbacks=[stop_node_at(cluster, 2, seen)])
    assert sorted(seen["before"]) == ["population-0", "population-1", "population-2"]
    assert sorted(seen["before"].values()) == [HEAD, "node_a", "node_b"]
    message = str(refused.value)
    assert "after a worker loss at step 3" in message
    assert "needs 3 workers of {'CPU': 2.0} placed STRICT_SPREAD" in message
    assert "its 2 node(s)" in message
    assert time.monotonic() - started < 60


# -- GPUs and workers: auto --------------------------------------------------------------
class GpuProbe:
    """What a worker given a GPU share is told by Ray."""

    def gpu_ids(self) -> list[int]:
        return [int(i) for i in ray.get_gpu_ids()]

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def test_two_half_gpu_workers_share_one_gpu_and_a_third_does_not_fit(cluster, tmp_path):
    from orchestrator.cluster import reserve
    from orchestrator.config import validate_mapping
    from orchestrator.context import RunContext
    from orchestrator.recovery import FailureBudget

    raw = eggroll_config(tmp_path, cluster.address)
    raw["resources"].update(cpus_per_worker=0.5, gpus_per_worker=0.5)
    config = validate_mapping(raw)
    bundle = {"CPU": 0.5, "GPU": 0.5}
    group = reserve([dict(bundle), dict(bundle)], "PACK", 20)
    try:
        ctx = RunContext(config, None, group, FailureBudget(0))
        assert ctx.device == "cuda"
        probes = [ctx.spawn(GpuProbe, role="probe", index=i) for i in range(2)]
        assert ray.get([p.gpu_ids.remote() for p in probes]) == [[0], [0]]
        names = cluster.node_names()
        assert {names[n] for n in ray.get([p.node.remote() for p in probes])} == {"node_b"}
        with pytest.raises(ClusterError, match=r"needs 3 workers of \{'CPU': 0.5, 'GPU': 0.5\}"):
            reserve([dict(bundle)] * 3, "PACK", 2)
        ctx.kill_workers()
    finally:
        ray.util.remove_placement_group(group)


def test_a_gpu_share_where_torch_has_no_cuda_is_refused_by_name(cluster, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees CUDA here: the refusal is for CPU-only torch")
    raw = with_resources(
        eggroll_config(tmp_path, cluster.address, workers=2),
        cpus_per_worker=0.5,
        gpus_per_worker=0.5,
    )
    with pytest.raises(ClusterError) as refused:
        unlocked.run(raw)
    message = str(refused.value)
    assert "resources.gpus_per_worker: 0.5" in message and "sees no CUDA device" in message
    assert "set resources.gpus_per_worker: 0" in message
