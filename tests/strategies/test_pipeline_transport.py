"""The pipeline's transports: the object store's chained calls and a Ray Compiled Graph.

Both move the same messages through the same actors in the same order, so a run ends on
the same numbers whichever carries them; a compiled graph is torn down before its actors
are killed, so a lost block is recovered and runs end without hanging.
"""

from __future__ import annotations

import pytest
import ray

from strategies.pipeline.transport import (
    CompiledGraphTransport,
    ObjectStoreTransport,
    open_transport,
)
from tests.conftest import on_step, small_config


class Stage:
    """A pass-through actor that appends its index to the message (a list)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def forward(self, message: list[int]) -> list[int]:
        return [*message, self.index]

    def ping(self) -> int:
        return self.index


def stages(count: int) -> list:
    return [ray.remote(num_cpus=0)(Stage).remote(k) for k in range(count)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["object_store", "compiled_graph"])
def test_a_message_passes_every_actor_in_order(ray_local, kind: str):
    actors = stages(3)
    transport = open_transport(kind, actors, max_in_flight=2)
    try:
        pending = [transport.submit([t]) for t in range(2)]
        assert [transport.receive(p) for p in pending] == [[0, 0, 1, 2], [1, 0, 1, 2]]
    finally:
        transport.close()
        for actor in actors:
            ray.kill(actor)


@pytest.mark.timeout(120)
def test_a_closed_graph_leaves_its_actors_free_for_another(ray_local):
    """Teardown ends the actors' loops: ordinary calls and a new graph work afterwards."""
    actors = stages(2)
    first = CompiledGraphTransport(actors, max_in_flight=2)
    assert first.receive(first.submit([])) == [0, 1]
    first.close()
    first.close()  # a second close (the controller's, after the driver's own) is harmless
    assert ray.get([a.ping.remote() for a in actors]) == [0, 1]
    second = CompiledGraphTransport(actors[::-1], max_in_flight=1)
    assert second.receive(second.submit([9])) == [9, 1, 0]
    second.close()
    for actor in actors:
        ray.kill(actor)


def test_the_object_store_is_the_default():
    from strategies.pipeline.config import PipelineConfig

    config = PipelineConfig()
    assert config.transport == "object_store"
    assert isinstance(open_transport(config.transport, [], 1), ObjectStoreTransport)
    with pytest.raises(ValueError, match="transport"):
        PipelineConfig(transport="nccl")


def run_pipeline(tmp_path, dataset_root, transport: str, steps: int, callbacks=()):
    import unlocked

    raw = small_config(
        tmp_path / transport,
        dataset_root,
        strategy={"transport": transport, "max_in_flight": 2, "batches_per_call": 2},
        tracking={"enabled": False},
        stop={"max_steps": steps},
    )
    return unlocked.run(raw, callbacks=list(callbacks))


@pytest.mark.timeout(240)
def test_compiled_graph_ends_on_the_object_store_numbers(ray_local, tmp_path, dataset_root):
    """Same batches, same order, same blocks: every final figure is bit-identical."""
    store = run_pipeline(tmp_path, dataset_root, "object_store", steps=4)
    compiled = run_pipeline(tmp_path, dataset_root, "compiled_graph", steps=4)
    for key in ("eval/accuracy", "eval/loss", "block-0/eval/aux_accuracy", "train/loss"):
        assert compiled.metrics[key] == store.metrics[key], key


@pytest.mark.timeout(240)
def test_a_killed_block_under_a_compiled_graph_is_recovered(ray_local, tmp_path, dataset_root):
    killed = []

    def kill_block_once(run, step: int, metrics: dict) -> None:
        if step == 3 and not killed:
            killed.append(run.strategy.workers[1])
            ray.kill(run.strategy.workers[1])

    result = run_pipeline(
        tmp_path, dataset_root, "compiled_graph", steps=6, callbacks=[on_step(kill_block_once)]
    )
    assert killed and result.failures == 1 and result.step == 6
    assert result.metrics["eval/accuracy"] > 0.1
