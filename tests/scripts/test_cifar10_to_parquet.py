"""scripts/cifar10_to_parquet.py on tiny synthetic archives of both standard layouts."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.config import DataConfig
from orchestrator.data import resolve_dataset
from orchestrator.data.stream import BatchStream

ROWS = 6  # per batch file: 30 train and 6 test images
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def load_script() -> ModuleType:
    path = Path(__file__).parents[2] / "scripts" / "cifar10_to_parquet.py"
    spec = importlib.util.spec_from_file_location("cifar10_to_parquet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batches() -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(0)
    return {
        name: (
            rng.integers(0, 256, (ROWS, 3072), dtype=np.uint8),
            rng.integers(0, 10, ROWS).tolist(),
        )
        for name in [*TRAIN_FILES, "test_batch"]
    }


def write_archive(path: Path, members: dict[str, bytes], folder: str) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def python_archive(path: Path, data: dict, poison: bytes | None = None) -> Path:
    members = {
        name: pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": images})
        for name, (images, labels) in data.items()
    }
    members["batches.meta"] = pickle.dumps({b"label_names": [n.encode() for n in NAMES]})
    if poison is not None:
        members["data_batch_3"] = poison
    return write_archive(path, members, "cifar-10-batches-py")


def binary_archive(path: Path, data: dict) -> Path:
    members = {
        f"{name}.bin": np.concatenate(
            [np.asarray(labels, np.uint8)[:, None], images], axis=1
        ).tobytes()
        for name, (images, labels) in data.items()
    }
    members["batches.meta.txt"] = ("\n".join(NAMES) + "\n\n").encode()
    return write_archive(path, members, "cifar-10-batches-bin")


@pytest.mark.parametrize("layout", [python_archive, binary_archive])
def test_both_archives_convert_to_the_same_parquet(tmp_path: Path, layout) -> None:
    script, data = load_script(), batches()
    counts = script.convert(layout(tmp_path / "cifar.tar.gz", data), tmp_path / "out")
    assert counts == {"train": 5 * ROWS, "test": ROWS}
    train = pq.read_table(tmp_path / "out" / "train" / "part-00000.parquet")
    images = np.concatenate([data[name][0] for name in TRAIN_FILES])
    labels = [label for name in TRAIN_FILES for label in data[name][1]]
    assert np.array_equal(
        train.column("image").combine_chunks().flatten().to_numpy(), images.reshape(-1)
    )
    assert train.column("y").to_pylist() == labels
    assert train.schema.metadata[b"class_names"].decode().split(",") == NAMES
    config = DataConfig(
        path=str(tmp_path / "out" / "train"),
        test_path=str(tmp_path / "out" / "test"),
        image={"shape": [3, 32, 32], "augment": False, "mean": [0, 0, 0], "std": [1, 1, 1]},
        root=str(tmp_path / "root"),
    )
    (x, y), *_ = BatchStream(resolve_dataset(config), "test", 4, seed=0)
    expected = data["test_batch"][0][:4].reshape(4, 3, 32, 32).astype(np.float32) / 255
    torch.testing.assert_close(x, torch.from_numpy(expected))
    assert y.tolist() == data["test_batch"][1][:4]


class Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_the_python_archive_is_unpickled_with_numpy_globals_only(tmp_path: Path) -> None:
    script = load_script()
    archive = python_archive(tmp_path / "bad.tar.gz", batches(), poison=pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing (posix|nt|os)\.system"):
        script.convert(archive, tmp_path / "out")
