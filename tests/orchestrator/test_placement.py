"""Placement without a cluster: what an unplaceable request says, and how many EGGROLL
workers `workers: auto` asks for."""

from __future__ import annotations

import pytest

from orchestrator.cluster import NodeResources, describe_node, unfit_message
from orchestrator.errors import ConfigError
from strategies.eggroll.config import EggrollConfig, workers_that_fit

HEAD = NodeResources(
    "aaaaaaaa11",
    "10.0.0.1",
    total={"CPU": 4.0, "memory": 1e9, "node:10.0.0.1": 1.0, "head": 1.0},
    free={"CPU": 1.5, "head": 1.0, "CPU_group_0_abc": 1.0},
)
GPU_NODE = NodeResources(
    "bbbbbbbb22",
    "10.0.0.2",
    total={"CPU": 8.0, "GPU": 1.0, "accelerator_type:H100": 1.0},
    free={"CPU": 8.0, "GPU": 0.5},
)


def test_a_node_shows_cpus_gpus_and_custom_resources_total_and_free():
    assert describe_node(HEAD) == (
        "10.0.0.1 (node aaaaaaaa): CPU 1.5/4 free, GPU 0/0 free, head 1/1 free"
    )
    assert describe_node(GPU_NODE) == "10.0.0.2 (node bbbbbbbb): CPU 8/8 free, GPU 0.5/1 free"


def test_the_error_says_what_was_asked_what_is_there_and_the_fix():
    message = unfit_message([{"CPU": 1, "GPU": 0.5}] * 3, "PACK", [HEAD, GPU_NODE], 60)
    assert message.startswith(
        "resources: the run needs 3 workers of {'CPU': 1.0, 'GPU': 0.5} placed PACK"
    )
    assert "within resources.placement_timeout_s=60 s; its 2 node(s): 10.0.0.1" in message
    assert "GPU 0.5/1 free" in message
    assert message.endswith(
        "Fix: lower resources.cpus_per_worker / gpus_per_worker, or use fewer workers, or add nodes"
    )


def test_strict_spread_over_too_few_nodes_names_the_strategy_as_the_fix():
    message = unfit_message([{"CPU": 1}] * 3, "STRICT_SPREAD", [HEAD, GPU_NODE], 5)
    assert (
        "Fix: set resources.placement_strategy: SPREAD (STRICT_SPREAD puts each worker on "
        "its own node: 3 workers need 3 nodes)" in message
    )
    packed = unfit_message([{"CPU": 6}] * 2, "STRICT_PACK", [HEAD, GPU_NODE], 5)
    assert "Fix: set resources.placement_strategy: PACK" in packed


def test_a_loss_that_cannot_be_replaced_says_when():
    message = unfit_message([{"CPU": 1}], "SPREAD", [], 5, "after a worker loss at step 7, ")
    assert message.startswith("resources: after a worker loss at step 7, the run needs 1")
    assert "its 0 node(s): no live node" in message


@pytest.mark.parametrize(
    ("available", "cpus", "gpus", "expected"),
    [
        ({"CPU": 6.0}, 1.0, 0.0, 6),
        ({"CPU": 6.0}, 2.0, 0.0, 3),
        ({"CPU": 64.0}, 1.0, 0.0, 8),  # at most one worker per member
        ({"CPU": 0.5}, 1.0, 0.0, 1),  # at least one: the placement error says what is missing
        ({"CPU": 8.0, "GPU": 1.0}, 1.0, 0.5, 2),  # two half-GPU workers share the one GPU
        ({"CPU": 8.0}, 1.0, 0.5, 1),  # GPUs asked, none free
    ],
)
def test_auto_workers_are_what_the_free_resources_hold(available, cpus, gpus, expected):
    assert workers_that_fit(available, cpus, gpus, population=8) == expected


def test_auto_workers_before_the_cluster_is_known():
    auto = EggrollConfig(workers="auto", population=8)
    assert auto.num_workers() == 1
    assert auto.summary() == "as many workers as the cluster fits (1..8)"
    assert auto.workers_that_fit({"CPU": 3.0}, 1.0, 0.0) == 3
    fixed = EggrollConfig(workers=2, population=8)
    assert fixed.workers_that_fit({"CPU": 64.0}, 1.0, 0.0) == 2
    assert fixed.summary() == "2 worker(s)"


def test_auto_workers_pass_the_population_check_a_count_must_pass(tmp_path):
    from orchestrator.config import validate_mapping

    raw = {
        "strategy": {"kind": "eggroll", "population": 4, "workers": "auto"},
        "checkpoint": {"root": str(tmp_path)},
    }
    assert validate_mapping(raw).strategy.workers == "auto"
    with pytest.raises(ConfigError, match="strategy.workers: 5 workers for a population of 4"):
        validate_mapping({**raw, "strategy": {**raw["strategy"], "workers": 5}})


def test_a_run_fills_its_whole_group_and_a_trial_its_slot(tmp_path):
    from types import SimpleNamespace

    from orchestrator.config import validate_mapping
    from orchestrator.context import RunContext
    from orchestrator.recovery import FailureBudget

    raw = {
        "strategy": {"kind": "eggroll", "population": 8, "workers": 2},
        "checkpoint": {"root": str(tmp_path)},
    }
    config = validate_mapping(raw)
    group = SimpleNamespace(bundle_count=6)  # what the controller reserved
    ctx = RunContext(config, None, group, FailureBudget(0))
    assert ctx.bundle_count == 6
    trial = ctx.for_trial(config, bundle_offset=4, name_prefix="slot-2/")
    assert trial.bundle_count == 2 and trial.bundle_offset == 4
