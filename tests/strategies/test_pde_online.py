"""Online PDE instances without Ray: ids as pure functions, the reservoir, the buffer."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from strategies.moe_hc.pde.configs import HeatConfig, OnlineDataConfig
from strategies.moe_hc.pde.online import (
    GeneratedShard,
    OnlineInstances,
    Reservoir,
    generate_shard,
    instance_features,
    regenerate,
    shard_location,
)
from strategies.moe_hc.pde.problems import build_problem, dataset_directory, online_directory
from tests.strategies.test_pde_shards import moto_endpoint, s3_root  # noqa: F401 (fixtures)

PROBLEM = build_problem(HeatConfig(nx=16, nt=5))


class InProcessSource:
    """Solves each requested shard at once, in this process; reports it at the next poll."""

    def __init__(self, directory: str, per_shard: int, capacity: int = 2) -> None:
        self.directory, self.per_shard, self.capacity = directory, per_shard, capacity
        self.done: list[GeneratedShard] = []
        self.submitted: list[int] = []

    def submit(self, shard: int) -> None:
        self.submitted.append(shard)
        generate_shard(PROBLEM, 7, self.directory, shard, self.per_shard)
        # A solver idle for its first 10 s, then busy 3 s of every 4.
        n = len(self.submitted)
        self.done.append(GeneratedShard(shard, 0, busy_s=3.0 * n, alive_s=10.0 + 4.0 * n))

    def completed(self, timeout: float | None) -> list[GeneratedShard]:
        done, self.done = self.done, []
        return done


def online(directory: str, source: InProcessSource, **settings: int) -> OnlineInstances:
    config = OnlineDataConfig(**settings)
    return OnlineInstances(PROBLEM, config, 7, directory, source, seed=3)


def shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("shard-*.parquet"))


def test_an_instance_is_a_function_of_its_id_alone():
    all_ten = instance_features(PROBLEM, 7, np.arange(10))
    np.testing.assert_array_equal(instance_features(PROBLEM, 7, np.array([6, 2])), all_ten[[6, 2]])
    assert not np.array_equal(instance_features(PROBLEM, 8, np.arange(10)), all_ten)
    features, solutions = regenerate(PROBLEM, 7, np.array([4]))
    assert solutions.shape == (1, 16 * 5) and solutions.dtype == np.float32
    np.testing.assert_allclose(solutions[0, :16], PROBLEM.reference(features)[0, 0], rtol=1e-6)


def test_a_full_reservoir_evicts_only_shards_trained_on():
    reservoir = Reservoir(capacity=2, per_shard=2)
    rng = np.random.default_rng(0)
    assert reservoir.add(0, rng) is None and reservoir.add(1, rng) is None
    assert not reservoir.has_room()
    with pytest.raises(ValueError, match="trained on"):
        reservoir.add(2, rng)
    reservoir.draws[1][:] = [1, 0]  # one of shard 1's instances not yet trained on
    assert not reservoir.has_room()
    reservoir.draws[1][1] = 3
    assert reservoir.add(2, rng) == 1
    np.testing.assert_array_equal(reservoir.ids(), [0, 1, 4, 5])
    assert reservoir.instances == 4


def test_eviction_picks_at_random_among_the_trained_on():
    picks = set()
    for seed in range(20):
        reservoir = Reservoir(capacity=3, per_shard=1)
        for shard in range(3):
            reservoir.add(shard, np.random.default_rng(0))
            reservoir.draws[shard][:] = 1
        picks.add(reservoir.add(9, np.random.default_rng(seed)))
    assert picks == {0, 1, 2}


def test_draws_are_distinct_uniform_and_counted():
    reservoir = Reservoir(capacity=4, per_shard=3)
    for shard in (5, 1, 3):
        reservoir.add(shard, np.random.default_rng(0))
    generator = torch.Generator().manual_seed(0)
    drawn = [reservoir.draw(4, generator) for _ in range(3000)]
    assert all(len(set(ids)) == 4 for ids in drawn)
    ids, counts = np.unique(np.concatenate(drawn), return_counts=True)
    np.testing.assert_array_equal(ids, [3, 4, 5, 9, 10, 11, 15, 16, 17])
    expected = 3000 * 4 / 9
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    assert sum(int(d.sum()) for d in reservoir.draws.values()) == 12000
    with pytest.raises(ValueError, match="warmup_shards"):
        reservoir.draw(10, generator)


def test_training_waits_only_until_the_buffer_is_warm(tmp_path):
    source = InProcessSource(str(tmp_path), per_shard=2)
    buffer = online(str(tmp_path), source, instances_per_shard=2, buffer_shards=4, warmup_shards=3)
    generator = torch.Generator().manual_seed(0)
    waits = []
    for t in range(40):
        buffer.next_batch(t, 3, generator)
        stats = buffer.stats()
        waits.append(stats["system/online_waits"])
        assert stats["system/online_buffer_instances"] <= 4 * 2
        # On storage: the buffer, plus what is finished and waiting for room.
        assert len(shard_files(tmp_path)) <= 4 + source.capacity
    assert waits[0] >= 1 and sum(waits[1:]) == 0
    assert stats["generator-0/system/busy_fraction"] == pytest.approx(0.75)
    assert stats["system/online_shards_evicted"] > 0  # the stream went on past the buffer
    assert stats["train/online_instances_seen"] > 4 * 2


def test_a_buffer_of_instances_not_trained_on_stops_the_solvers(tmp_path):
    source = InProcessSource(str(tmp_path), per_shard=4, capacity=2)
    buffer = online(str(tmp_path), source, instances_per_shard=4, buffer_shards=3, warmup_shards=3)
    generator = torch.Generator().manual_seed(0)
    for t in range(3):  # 3 draws: no shard of 4 instances can be fully trained on yet
        buffer.next_batch(t, 1, generator)
    assert len(source.submitted) == 3 + source.capacity
    assert len(shard_files(tmp_path)) == 3 + source.capacity


def test_every_batch_can_be_regenerated_from_its_ids(tmp_path):
    buffer = online(str(tmp_path), InProcessSource(str(tmp_path), 2), instances_per_shard=2)
    generator = torch.Generator().manual_seed(1)
    for t in range(12):
        ids, features, solutions = buffer.next_batch(t, 4, generator)
        again_features, again_solutions = regenerate(PROBLEM, 7, ids)
        np.testing.assert_array_equal(features.numpy(), again_features)
        np.testing.assert_array_equal(solutions.numpy(), again_solutions)
    batches, seen = buffer.seen()
    np.testing.assert_array_equal(batches, np.arange(12))
    assert seen.shape == (12, 4)


def test_a_restored_buffer_draws_the_batch_the_interrupted_run_would_have(tmp_path):
    settings = {"instances_per_shard": 2, "buffer_shards": 3, "warmup_shards": 2}
    first = online(str(tmp_path), InProcessSource(str(tmp_path), 2), **settings)
    for t in range(6):
        first.next_batch(t, 2, torch.Generator().manual_seed(t))
    state = copy.deepcopy(first.state())
    expected = first.next_batch(6, 2, torch.Generator().manual_seed(6))

    lost = int(state["reservoir"]["shards"][0])  # lost from storage: solved again
    Path(shard_location(str(tmp_path), lost)).unlink(missing_ok=True)
    (tmp_path / "shard-999999999.parquet").write_bytes(b"a stray file from another run")
    resumed = online(str(tmp_path), InProcessSource(str(tmp_path), 2), **settings)
    resumed.load(state)
    ids, features, solutions = resumed.next_batch(6, 2, torch.Generator().manual_seed(6))
    np.testing.assert_array_equal(ids, expected[0])
    torch.testing.assert_close(features, expected[1])
    torch.testing.assert_close(solutions, expected[2])
    np.testing.assert_array_equal(resumed.seen()[1][:6], first.seen()[1][:6])
    assert "shard-999999999.parquet" not in shard_files(tmp_path)
    # What was requested at the checkpoint is requested again before any new shard.
    assert resumed.source.submitted[: len(state["requested"])] == state["requested"].tolist()


def test_the_online_buffer_lives_beside_the_dataset_and_outside_its_digest(tmp_path):
    plain = HeatConfig(root=str(tmp_path))
    streamed = plain.model_copy(update={"online": OnlineDataConfig()})
    assert dataset_directory(streamed) == dataset_directory(plain)
    assert online_directory(streamed, "run-a") == f"{dataset_directory(plain)}/online/run-a"


def test_a_warmup_larger_than_the_buffer_is_refused():
    with pytest.raises(ValueError, match="lower warmup_shards"):
        OnlineDataConfig(buffer_shards=2, warmup_shards=3)


def test_the_buffer_in_a_bucket(s3_root):  # noqa: F811 (the fixture)
    directory = online_directory(PROBLEM.config.model_copy(update={"root": s3_root}), "run-s3")
    assert directory.startswith("s3://")
    source = InProcessSource(directory, per_shard=2)
    buffer = online(directory, source, instances_per_shard=2, buffer_shards=3, warmup_shards=2)
    fs, path = pafs.FileSystem.from_uri(directory)
    for t in range(15):
        ids, features, _ = buffer.next_batch(t, 2, torch.Generator().manual_seed(t))
        np.testing.assert_array_equal(features.numpy(), regenerate(PROBLEM, 7, ids)[0])
        held = fs.get_file_info(pafs.FileSelector(path))
        assert len(held) <= 3 + source.capacity
    assert buffer.stats()["system/online_shards_evicted"] > 0
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert {f"shard-{s:09d}.parquet" for s in buffer.reservoir.draws} <= names
