"""PDE instances stored as Parquet shards on any filesystem ``pyarrow.fs`` reaches.

A location is a local path or a URI (``file://``, ``s3://``, ``gs://``, ``hdfs://``), resolved
the way the rest of the project resolves data (``orchestrator.data.files``), so a
``strategy.problem.root`` of ``s3://bucket/prefix`` stays a bucket, not a local ``s3:/bucket``.

A dataset is a directory of ``part-00000.parquet``, ``part-00001.parquet``, ... with columns
``instance`` (int64), ``features`` (fixed_size_list<float32>[f]) and ``solution``
(fixed_size_list<float32>[prod(grid)]). Fixed-size lists keep each column one contiguous
float32 buffer, so reading back is a reshape, not a per-row conversion. The grid shape and
the caller's metadata (JSON) live in every shard's schema metadata under ``unlocked.pde``.
The online buffer (``strategies.moe_hc.pde.online``) stores single shards in the same format.

A reader must never see half a dataset. On a local disk the shards are written into a
hidden sibling directory that is renamed into place at the end (rename is atomic on one
filesystem, and refuses to replace a non-empty directory, so a finished dataset is never
overwritten). Object stores cannot rename a directory, so there the shards go to their
final keys and a ``_COMPLETE`` marker is put last: one PUT is atomic, and a dataset without
its marker does not exist.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data import files

METADATA_KEY = b"unlocked.pde"
SHARD_GLOB = "part-*.parquet"
COMPLETE_MARKER = "_COMPLETE"
_FIX = "delete it so that it is regenerated"


def _fixed_size_column(values: np.ndarray) -> pa.FixedSizeListArray:
    rows = values.reshape(values.shape[0], -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), rows.shape[1])


def _as_float32(features: np.ndarray, solutions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.ascontiguousarray(features, dtype=np.float32)
    solutions = np.ascontiguousarray(solutions, dtype=np.float32)
    if features.ndim != 2 or solutions.ndim < 2 or features.shape[0] != solutions.shape[0]:
        raise ValueError(
            f"expected features (n, f) and solutions (n, *grid) with the same n, got "
            f"{features.shape} and {solutions.shape}"
        )
    return features, solutions


def _schema(features: np.ndarray, solutions: np.ndarray, header: dict[str, Any]) -> pa.Schema:
    return pa.schema(
        [
            ("instance", pa.int64()),
            ("features", pa.list_(pa.float32(), features.shape[1])),
            ("solution", pa.list_(pa.float32(), int(np.prod(solutions.shape[1:])))),
        ],
        metadata={METADATA_KEY: json.dumps(header).encode()},
    )


def _table(
    schema: pa.Schema, ids: np.ndarray, features: np.ndarray, solutions: np.ndarray
) -> pa.Table:
    columns = [
        pa.array(np.asarray(ids, dtype=np.int64)),
        _fixed_size_column(features),
        _fixed_size_column(solutions),
    ]
    return pa.table(columns, schema=schema)


def write_instances(
    directory: str,
    features: np.ndarray,
    solutions: np.ndarray,
    metadata: dict[str, Any],
    rows_per_shard: int = 16,
) -> None:
    """Write features (n, f) and solutions (n, *grid), both stored as float32, as shards.

    Raises FileExistsError (and leaves the existing dataset untouched) if ``directory``
    already holds a complete dataset (locally: any files).
    """
    features, solutions = _as_float32(features, solutions)
    count = features.shape[0]
    header = {"grid_shape": list(solutions.shape[1:]), "instances": count, "metadata": metadata}
    schema = _schema(features, solutions, header)

    def tables() -> Iterator[tuple[str, pa.Table]]:
        for shard, start in enumerate(range(0, count, rows_per_shard)):
            stop = min(start + rows_per_shard, count)
            ids = np.arange(start, stop)
            table = _table(schema, ids, features[start:stop], solutions[start:stop])
            yield f"part-{shard:05d}.parquet", table

    fs, path = files.resolve(directory)
    if isinstance(fs, pafs.LocalFileSystem):
        _publish_by_rename(directory, path, tables())
    else:
        _publish_with_marker(directory, fs, path, tables())


def _publish_by_rename(directory: str, path: str, tables: Iterator[tuple[str, pa.Table]]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, table in tables:
            pq.write_table(table, staging / name)
        # os.rename replaces an empty directory but fails on a non-empty one: a dataset
        # another process finished first is never overwritten.
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the dataset from other users
        try:
            os.rename(staging, target)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f"{directory} already holds files; not overwritten") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_with_marker(
    directory: str, fs: pafs.FileSystem, path: str, tables: Iterator[tuple[str, pa.Table]]
) -> None:
    marker = f"{path}/{COMPLETE_MARKER}"
    if files.exists(fs, marker):
        raise FileExistsError(f"{directory} already holds a complete dataset; not overwritten")
    # Shards of a writer that stopped early would mix with these; a racing writer of the
    # same dataset writes the same bytes (builds are deterministic), so clearing is safe.
    fs.delete_dir_contents(path, missing_dir_ok=True)
    fs.create_dir(path, recursive=True)
    for name, table in tables:
        pq.write_table(table, f"{path}/{name}", filesystem=fs)
    fs.open_output_stream(marker).close()


def _is_complete(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a finished dataset stands at ``path``: locally, any entry (only a rename puts
    one there); on an object store, its marker."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return files.exists(fs, f"{path}/{COMPLETE_MARKER}")
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def _shards(directory: str) -> tuple[pafs.FileSystem, list[str], dict[str, Any]]:
    """The filesystem, the shard paths in order and the header they all carry; ValueError
    if the dataset is absent, incomplete or not written by ``write_instances``."""
    fs, path = files.resolve(directory)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    paths = sorted(
        e.path
        for e in entries
        if e.type == pafs.FileType.File and fnmatch.fnmatch(e.base_name, SHARD_GLOB)
    )
    if not paths:
        raise ValueError(f"{directory} holds no PDE shards ({SHARD_GLOB}); {_FIX}")
    if not _is_complete(fs, path):
        raise ValueError(
            f"{directory} has no {COMPLETE_MARKER} marker: it is being written, or its writer "
            f"stopped; {_FIX}"
        )
    headers = {(pq.read_schema(p, filesystem=fs).metadata or {}).get(METADATA_KEY) for p in paths}
    if None in headers or len(headers) != 1:
        raise ValueError(
            f"the shards in {directory} lack matching {METADATA_KEY.decode()} schema metadata, "
            f"so they were not written by write_instances or not by one call of it; {_FIX}"
        )
    return fs, paths, json.loads(headers.pop())


def _column_values(table: pa.Table, name: str) -> np.ndarray:
    """The flat float32 values of a fixed-size-list column; no copy if it is one chunk."""
    return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=True)


def read_instances(directory: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features (n, f), solutions (n, *grid), metadata) of a dataset, in instance order.

    The arrays are read-only views of Arrow memory when a single shard allows it; copy them
    before writing into them.
    """
    fs, paths, header = _shards(directory)
    table = ds.dataset(paths, filesystem=fs, format="parquet").to_table()
    count = header["instances"]
    instances = table.column("instance").to_numpy()
    if not np.array_equal(instances, np.arange(count)):
        raise ValueError(
            f"{directory} holds {table.num_rows} rows, not instances 0..{count - 1} in order; "
            f"{_FIX}"
        )
    features = _column_values(table, "features").reshape(count, -1)
    solutions = _column_values(table, "solution").reshape(count, *header["grid_shape"])
    return features, solutions, header["metadata"]


def materialize(
    directory: str,
    build: Callable[[], tuple[np.ndarray, np.ndarray, dict[str, Any]]],
    rows_per_shard: int = 16,
) -> str:
    """``directory`` holding the dataset ``build()`` makes, calling build only if needed.

    Several processes may race here: locally each builds into its own staging directory
    and the first rename wins; on an object store the last marker wins. Either way every
    process ends with the same data, as long as build is deterministic, as it should be.
    """
    fs, path = files.resolve(directory)
    if _is_complete(fs, path):
        _shards(directory)
        return directory
    features, solutions, metadata = build()
    try:
        write_instances(directory, features, solutions, metadata, rows_per_shard)
    except FileExistsError:
        _shards(directory)
    return directory


def write_shard(
    location: str, ids: np.ndarray, features: np.ndarray, solutions: np.ndarray, metadata: dict
) -> None:
    """One shard file at ``location`` (instances ``ids``), appearing whole or not at all:
    written under a temporary name and renamed on a disk, one PUT on an object store."""
    features, solutions = _as_float32(features, solutions)
    header = {"grid_shape": list(solutions.shape[1:]), "instances": len(ids), "metadata": metadata}
    table = _table(_schema(features, solutions, header), ids, features, solutions)
    fs, path = files.resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(table, path, filesystem=fs)
        return
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    staging = f"{parent}/.{name}.{uuid.uuid4().hex}"
    try:
        pq.write_table(table, staging, filesystem=fs)
        fs.move(staging, path)
    finally:
        if files.exists(fs, staging):
            fs.delete_file(staging)


def read_shard(location: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(ids (n,), features (n, f), solutions (n, *grid), metadata) of one shard file.

    Raises FileNotFoundError if it is absent and ValueError if it was not written by
    ``write_shard``.
    """
    fs, path = files.resolve(location)
    with fs.open_input_file(path) as source:
        table = pq.read_table(source)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{location} lacks {METADATA_KEY.decode()} schema metadata; {_FIX}")
    header = json.loads(raw)
    count = table.num_rows
    features = _column_values(table, "features").reshape(count, -1)
    solutions = _column_values(table, "solution").reshape(count, *header["grid_shape"])
    return table.column("instance").to_numpy(), features, solutions, header["metadata"]
