"""Parquet shards of PDE instances: round trip, build-once materialisation, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from strategies.moe_hc.pde.shards import materialize, read_instances, write_instances

METADATA = {"problem": "heat", "diffusivity": 0.5, "modes": [1, 2, 3]}


def instances(count: int = 37) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(count, 3)).astype(np.float32)
    solutions = rng.normal(size=(count, 5, 7)).astype(np.float32)
    return features, solutions, METADATA


def test_round_trip_across_shards(tmp_path: Path) -> None:
    features, solutions, metadata = instances()
    directory = tmp_path / "heat"
    write_instances(str(directory), features, solutions, metadata, rows_per_shard=16)
    assert sorted(p.name for p in directory.iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert pq.read_table(directory / "part-00002.parquet").num_rows == 37 - 32
    read_features, read_solutions, read_metadata = read_instances(str(directory))
    assert read_features.dtype == np.float32 and read_solutions.dtype == np.float32
    np.testing.assert_array_equal(read_features, features)
    np.testing.assert_array_equal(read_solutions, solutions)
    assert read_metadata == metadata
    assert [p.name for p in tmp_path.iterdir()] == ["heat"]  # no staging directory left


def test_materialize_builds_once(tmp_path: Path) -> None:
    calls = []

    def build() -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        calls.append(1)
        return instances(5)

    directory = str(tmp_path / "cache")
    assert materialize(directory, build, rows_per_shard=2) == directory
    assert materialize(directory, build, rows_per_shard=2) == directory
    assert len(calls) == 1
    np.testing.assert_array_equal(read_instances(directory)[1], instances(5)[1])


def test_a_finished_dataset_is_never_overwritten(tmp_path: Path) -> None:
    directory = str(tmp_path / "cache")
    features, solutions, _ = instances(4)
    write_instances(directory, features, solutions, {"writer": "first"})
    with pytest.raises(FileExistsError):
        write_instances(directory, features + 1, solutions, {"writer": "second"})
    # What a process that lost the race does: it keeps the winner's dataset.
    assert materialize(directory, lambda: (features + 1, solutions, {"writer": "second"}))
    read_features, _, metadata = read_instances(directory)
    assert metadata == {"writer": "first"}
    np.testing.assert_array_equal(read_features, features)


def test_an_empty_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path}.*delete it"):
        read_instances(str(tmp_path))


def test_shards_without_metadata_are_an_error_naming_the_directory(tmp_path: Path) -> None:
    table = pa.table({"instance": pa.array([0], pa.int64()), "features": [[1.0]]})
    pq.write_table(table, tmp_path / "part-00000.parquet")
    with pytest.raises(ValueError, match=f"{tmp_path}.*delete it"):
        read_instances(str(tmp_path))
    with pytest.raises(ValueError, match=f"{tmp_path}.*delete it"):
        materialize(str(tmp_path), instances)
