"""Convert a local CIFAR-10 archive to Parquet that `unlocked` reads as an image data set.

    python scripts/cifar10_to_parquet.py cifar-10-python.tar.gz data/cifar10

writes ``data/cifar10/train/part-00000.parquet`` (50000 rows) and
``data/cifar10/test/part-00000.parquet`` (10000 rows), each with the columns ``image``
(fixed-size lists of 3072 uint8 values, channel-major: shape [3, 32, 32]) and ``y`` (the class
id 0..9; the class names are in the schema metadata). Then, in a run config:

    data:
      path: data/cifar10/train
      test_path: data/cifar10/test
      image: {shape: [3, 32, 32]}

Both standard archives work and nothing is downloaded. The "python version"
(cifar-10-python.tar.gz) holds pickles, and unpickling can run any code the file names, so
they are read by an unpickler that resolves only the three numpy names an array needs and
refuses every other. The "binary version" (cifar-10-binary.tar.gz) needs no pickle at all:
each record is 1 label byte then 3072 pixel bytes.
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PIXELS = 3 * 32 * 32
ROW_GROUP_ROWS = 1000
_PYTHON_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_BINARY_SPLITS = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["test_batch.bin"],
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays, nothing else: any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if module in {"numpy.core.multiarray", "numpy._core.multiarray"} and name == "_reconstruct":
            return _reconstruct()
        raise pickle.UnpicklingError(
            f"refusing {module}.{name}: a CIFAR-10 batch holds no such object"
        )


def _reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct as found
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as found
    return found


def _unpickled(blob: bytes) -> Any:
    # encoding="bytes": the archive was pickled by Python 2, whose str keys arrive as bytes
    return ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()


def _members(archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    return {Path(member.name).name: member for member in archive.getmembers() if member.isfile()}


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    assert handle is not None, f"{member.name} is a regular file"
    return handle.read()


def read_split(archive: tarfile.TarFile, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels uint8 [N, 3072] (red plane, green, blue) and labels int64 [N] of one split."""
    members = _members(archive)
    names = _PYTHON_SPLITS if _PYTHON_SPLITS["test"][0] in members else _BINARY_SPLITS
    missing = [name for name in names[split] if name not in members]
    if missing:
        raise SystemExit(
            f"not a CIFAR-10 archive: {missing} missing; expected the python or binary version"
        )
    images, labels = [], []
    for name in names[split]:
        blob = _read(archive, members[name])
        if names is _BINARY_SPLITS:
            records = np.frombuffer(blob, np.uint8).reshape(-1, 1 + PIXELS)
            labels.append(records[:, 0].astype(np.int64))
            images.append(records[:, 1:])
        else:
            batch = _unpickled(blob)
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, PIXELS))
    return np.concatenate(images), np.concatenate(labels)


def class_names(archive: tarfile.TarFile) -> list[str]:
    members = _members(archive)
    if "batches.meta" in members:
        meta = _unpickled(_read(archive, members["batches.meta"]))
        return [name.decode() for name in meta[b"label_names"]]
    text = _read(archive, members["batches.meta.txt"]).decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_split(images: np.ndarray, labels: np.ndarray, names: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    column = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), PIXELS)
    table = pa.table({"image": column, "y": pa.array(labels)})
    metadata = {"shape": "3,32,32", "class_names": ",".join(names)}
    pq.write_table(table.replace_schema_metadata(metadata), path, row_group_size=ROW_GROUP_ROWS)


def convert(archive_path: Path, out: Path) -> dict[str, int]:
    """Write ``out/{train,test}/part-00000.parquet``; return the rows of each split."""
    counts = {}
    with tarfile.open(archive_path, "r:*") as archive:
        names = class_names(archive)
        for split in ("train", "test"):
            images, labels = read_split(archive, split)
            write_split(images, labels, names, out / split / "part-00000.parquet")
            counts[split] = len(labels)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "archive", type=Path, help="cifar-10-python.tar.gz or cifar-10-binary.tar.gz"
    )
    parser.add_argument("out", type=Path, help="directory to write train/ and test/ into")
    args = parser.parse_args(argv)
    counts = convert(args.archive, args.out)
    print(f"wrote {counts['train']} train and {counts['test']} test images under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
