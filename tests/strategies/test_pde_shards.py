"""Parquet shards of PDE instances: round trip, build-once materialisation, clear errors,
on a disk, through a ``file://`` URI and in an S3 bucket (moto's local server)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from strategies.moe_hc.pde.configs import HeatConfig
from strategies.moe_hc.pde.problems import build_problem, dataset_directory, load_instances
from strategies.moe_hc.pde.shards import materialize, read_instances, write_instances
from tests.conftest import free_port

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


def test_a_file_uri_is_a_local_dataset(tmp_path: Path) -> None:
    location = f"file://{tmp_path}/heat"
    assert materialize(location, lambda: instances(5), rows_per_shard=2) == location
    assert sorted(p.name for p in (tmp_path / "heat").iterdir())[0] == "part-00000.parquet"
    np.testing.assert_array_equal(read_instances(location)[1], instances(5)[1])
    np.testing.assert_array_equal(read_instances(str(tmp_path / "heat"))[0], instances(5)[0])


def test_a_bucket_root_stays_a_uri() -> None:
    config = HeatConfig(root="s3://bucket/datasets/")
    assert dataset_directory(config).startswith("s3://bucket/datasets/pde/heat-")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A local S3 (moto's server) on loopback, for the whole session."""
    server_module = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    yield f"http://127.0.0.1:{server._port}"
    server.stop()


@pytest.fixture
def s3_root(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the local S3, reached as any s3:// root is (endpoint from the
    environment, as on a cluster whose nodes name theirs)."""
    for name, value in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"pde-{uuid.uuid4().hex[:12]}"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")
    fs.create_dir(bucket)
    return f"s3://{bucket}/datasets"


def test_a_dataset_in_a_bucket_is_complete_only_with_its_marker(s3_root: str) -> None:
    location = f"{s3_root}/heat"
    calls = []

    def build() -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        calls.append(1)
        return instances(5)

    assert materialize(location, build, rows_per_shard=2) == location
    assert materialize(location, build, rows_per_shard=2) == location
    assert len(calls) == 1
    np.testing.assert_array_equal(read_instances(location)[1], instances(5)[1])
    with pytest.raises(FileExistsError):
        write_instances(location, *instances(5))
    fs, path = pafs.FileSystem.from_uri(location)
    fs.delete_file(f"{path}/_COMPLETE")  # as if its writer had stopped before the end
    with pytest.raises(ValueError, match="_COMPLETE.*delete it"):
        read_instances(location)
    materialize(location, build, rows_per_shard=3)  # written again, stale shards cleared
    assert len(calls) == 2
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]
    assert sorted(names) == ["_COMPLETE", "part-00000.parquet", "part-00001.parquet"]


def test_instances_of_a_problem_rooted_in_a_bucket(s3_root: str, tmp_path: Path) -> None:
    problem = build_problem(HeatConfig(train_instances=3, test_instances=2, nx=16, nt=5))
    in_bucket = build_problem(problem.config.model_copy(update={"root": s3_root}))
    on_disk = build_problem(problem.config.model_copy(update={"root": str(tmp_path)}))
    features, solutions = load_instances(in_bucket, "train")
    torch.testing.assert_close(load_instances(in_bucket, "train")[1], solutions)
    torch.testing.assert_close(load_instances(on_disk, "train")[0], features)
    fs, path = pafs.FileSystem.from_uri(dataset_directory(in_bucket.config))
    assert fs.get_file_info(f"{path}/train/_COMPLETE").type == pafs.FileType.File
