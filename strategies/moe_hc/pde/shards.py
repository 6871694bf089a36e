"""PDE instances stored as Parquet shards: one row per instance, generated once, read by all.

A dataset is a directory of ``part-00000.parquet``, ``part-00001.parquet``, ... with columns
``instance`` (int64), ``features`` (fixed_size_list<float32>[f]) and ``solution``
(fixed_size_list<float32>[prod(grid)]). Fixed-size lists keep each column one contiguous
float32 buffer, so reading back is a reshape, not a per-row conversion. The grid shape and
the caller's metadata (JSON) live in every shard's schema metadata under ``unlocked.pde``.

Shards are written into a hidden sibling directory that is renamed into place at the end:
rename is atomic on one filesystem, so a reader, or a second process building the same
dataset, sees either nothing or a complete dataset, never a half-written one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

METADATA_KEY = b"unlocked.pde"
SHARD_GLOB = "part-*.parquet"


def _fixed_size_column(values: np.ndarray) -> pa.FixedSizeListArray:
    rows = values.reshape(values.shape[0], -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), rows.shape[1])


def write_instances(
    directory: str,
    features: np.ndarray,
    solutions: np.ndarray,
    metadata: dict[str, Any],
    rows_per_shard: int = 16,
) -> None:
    """Write features (n, f) and solutions (n, *grid), both stored as float32, as shards.

    Raises FileExistsError (and leaves the existing dataset untouched) if ``directory``
    already holds files.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    solutions = np.ascontiguousarray(solutions, dtype=np.float32)
    if features.ndim != 2 or solutions.ndim < 2 or features.shape[0] != solutions.shape[0]:
        raise ValueError(
            f"expected features (n, f) and solutions (n, *grid) with the same n, got "
            f"{features.shape} and {solutions.shape}"
        )
    count = features.shape[0]
    header = {"grid_shape": list(solutions.shape[1:]), "instances": count, "metadata": metadata}
    schema = pa.schema(
        [
            ("instance", pa.int64()),
            ("features", pa.list_(pa.float32(), features.shape[1])),
            ("solution", pa.list_(pa.float32(), int(np.prod(solutions.shape[1:])))),
        ],
        metadata={METADATA_KEY: json.dumps(header).encode()},
    )
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for shard, start in enumerate(range(0, count, rows_per_shard)):
            stop = min(start + rows_per_shard, count)
            table = pa.table(
                [
                    pa.array(np.arange(start, stop, dtype=np.int64)),
                    _fixed_size_column(features[start:stop]),
                    _fixed_size_column(solutions[start:stop]),
                ],
                schema=schema,
            )
            pq.write_table(table, staging / f"part-{shard:05d}.parquet")
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


def _shards(directory: str) -> tuple[list[Path], dict[str, Any]]:
    """The shard paths in order and the header they all carry; ValueError if incomplete."""
    fix = "delete it so that it is regenerated"
    paths = sorted(Path(directory).glob(SHARD_GLOB))
    if not paths:
        raise ValueError(f"{directory} holds no PDE shards ({SHARD_GLOB}); {fix}")
    headers = {(pq.read_schema(path).metadata or {}).get(METADATA_KEY) for path in paths}
    if None in headers or len(headers) != 1:
        raise ValueError(
            f"the shards in {directory} lack matching {METADATA_KEY.decode()} schema metadata, "
            f"so they were not written by write_instances or not by one call of it; {fix}"
        )
    return paths, json.loads(headers.pop())


def _column_values(table: pa.Table, name: str) -> np.ndarray:
    """The flat float32 values of a fixed-size-list column; no copy if it is one chunk."""
    return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=True)


def read_instances(directory: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features (n, f), solutions (n, *grid), metadata) of a dataset, in instance order.

    The arrays are read-only views of Arrow memory when a single shard allows it; copy them
    before writing into them.
    """
    paths, header = _shards(directory)
    table = ds.dataset([str(path) for path in paths], format="parquet").to_table()
    count = header["instances"]
    instances = table.column("instance").to_numpy()
    if not np.array_equal(instances, np.arange(count)):
        raise ValueError(
            f"{directory} holds {table.num_rows} rows, not instances 0..{count - 1} in order; "
            "delete it so that it is regenerated"
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

    Several processes may race here: each builds into its own staging directory and the
    first rename wins; the others keep the winner's dataset (the same data, if build is
    deterministic, as it should be).
    """
    path = Path(directory)
    if path.is_dir() and any(path.iterdir()):
        _shards(directory)
        return directory
    features, solutions, metadata = build()
    try:
        write_instances(directory, features, solutions, metadata, rows_per_shard)
    except FileExistsError:
        _shards(directory)
    return directory
