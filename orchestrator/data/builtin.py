"""Built-in datasets that need no download, written once (sharded Parquet for tables and
images, UTF-8 text files for text) and then reused.

Each is generated from a fixed seed of its own, never the run seed, so every run (and every
strategy being compared) trains and evaluates on exactly the same rows.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import itertools
import math
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data import files
from orchestrator.data.corpus import generated_corpus
from orchestrator.data.rows import Rows, rebatch
from orchestrator.data.spec import InputKind
from orchestrator.errors import ConfigError

SPLITS = ("train", "test")
COMPLETE_MARKER = "_COMPLETE"
_SHARD_ROWS = 16384
_ROW_GROUP_ROWS = 4096


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in: tables and images come as ``rows``, text as ``text``.

    ``shape`` is one example's, (features,) or (C, H, W); a text set has none of its own, as
    the config's context cuts its windows. ``num_classes`` is a text set's byte vocabulary.
    """

    name: str
    description: str
    kind: InputKind
    shape: tuple[int, ...]
    num_classes: int
    default_size: int
    fixed_size: bool  # the size comes from bundled data, so data.size cannot change it
    rows: Callable[[str, int], Iterator[Rows]] | None = None  # (split, size) -> chunks of (x, y)
    text: Callable[[str, int], str] | None = None  # (split, size) -> the split's text
    crop_padding: int = 4  # an image set's default augmentation
    flip: bool = True

    @property
    def num_features(self) -> int:
        return math.prod(self.shape)

    @property
    def column(self) -> str:
        """The column of the examples: "x" for a table, "image" for images."""
        return "image" if self.kind == "image" else "x"

    def schema(self) -> pa.Schema:
        metadata = {"num_features": str(self.num_features), "num_classes": str(self.num_classes)}
        if self.kind == "image":
            metadata["shape"] = ",".join(map(str, self.shape))
        return pa.schema(
            [(self.column, pa.list_(pa.float32(), self.num_features)), ("y", pa.int64())],
            metadata=metadata,
        )


def builtin_dataset(name: str, size: int | None) -> tuple[BuiltinDataset, int]:
    """Look up a built-in and the size it will be generated at; ConfigError names the field."""
    spec = BUILTIN_DATASETS.get(name)
    if spec is None:
        raise ConfigError(
            f"data.dataset: {name!r} is not a built-in dataset; choose one of "
            f"{sorted(BUILTIN_DATASETS)} or set data.path to your own Parquet data"
        )
    if size is None:
        return spec, spec.default_size
    if spec.fixed_size:
        raise ConfigError(
            f"data.size: {size!r} is not allowed for the built-in {name!r}, which always has "
            f"{spec.default_size} samples; remove data.size"
        )
    return spec, size


def materialize(spec: BuiltinDataset, size: int, root: str) -> str:
    """Write ``<root>/<name>-<size>/{train,test}`` unless a complete copy exists; return it.

    The data is staged in a sibling directory and renamed into place with its completion
    marker inside, so a crash never leaves a directory that looks finished, and concurrent
    runs that race each other both end up with one complete copy.
    """
    location = files.join(files.absolute(root), f"{spec.name}-{size}")
    fs, final = files.resolve(location)
    if files.exists(fs, f"{final}/{COMPLETE_MARKER}"):
        return location
    parent, base = final.rsplit("/", 1)
    staging = f"{parent}/.{base}.tmp-{uuid.uuid4().hex}"
    try:
        for split in SPLITS:
            if spec.text is not None:
                _write_text(fs, f"{staging}/{split}.txt", spec.text(split, size))
            else:
                _write_split(fs, f"{staging}/{split}", spec.rows(split, size), spec.schema())
        fs.open_output_stream(f"{staging}/{COMPLETE_MARKER}").close()
        _publish(fs, staging, final)
    finally:
        if files.exists(fs, staging):
            fs.delete_dir(staging)
    return location


def _write_split(
    fs: pafs.FileSystem, directory: str, rows: Iterator[Rows], schema: pa.Schema
) -> None:
    fs.create_dir(directory)
    groups = rebatch(rows, _ROW_GROUP_ROWS, keep_last=True)
    for shard in itertools.count():
        shard_groups = list(itertools.islice(groups, _SHARD_ROWS // _ROW_GROUP_ROWS))
        if not shard_groups:
            return
        path = f"{directory}/part-{shard:05d}.parquet"
        with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, schema) as writer:
            for x, y in shard_groups:
                width = math.prod(x.shape[1:])
                features = pa.FixedSizeListArray.from_arrays(x.reshape(-1), width)
                table = pa.Table.from_arrays([features, pa.array(y)], schema=schema)
                writer.write_table(table, row_group_size=_ROW_GROUP_ROWS)


def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    fs.create_dir(path.rsplit("/", 1)[0])
    with fs.open_output_stream(path) as sink:
        sink.write(text.encode("utf-8"))


def _publish(fs: pafs.FileSystem, staging: str, final: str) -> None:
    """Move the staged copy into place; object stores, which cannot rename, copy file by file."""
    if files.exists(fs, f"{final}/{COMPLETE_MARKER}"):
        return  # a concurrent run published first
    if files.exists(fs, final):
        fs.delete_dir(final)  # left by a copy that stopped before its marker
    try:
        fs.move(staging, final)
    except (OSError, NotImplementedError):
        if files.exists(fs, f"{final}/{COMPLETE_MARKER}"):
            return
        for entry in fs.get_file_info(pafs.FileSelector(staging, recursive=True)):
            if entry.type == pafs.FileType.File and entry.base_name != COMPLETE_MARKER:
                target = final + entry.path[len(staging) :]
                fs.create_dir(target.rsplit("/", 1)[0])
                fs.copy_file(entry.path, target)
        fs.copy_file(f"{staging}/{COMPLETE_MARKER}", f"{final}/{COMPLETE_MARKER}")


_DIGITS_SEED = 1797


def _digits_rows(split: str, size: int) -> Iterator[Rows]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=_DIGITS_SEED
    )
    yield (x_train, y_train) if split == "train" else (x_test, y_test)


def _digits_file() -> str:
    """scikit-learn's copy of the UCI digits, found without importing scikit-learn."""
    found = importlib.util.find_spec("sklearn")
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            "data.dataset: the built-in digits are read from scikit-learn's wheel; install "
            "scikit-learn (pip install scikit-learn)"
        )
    return os.path.join(found.submodule_search_locations[0], "datasets/data/digits.csv.gz")


def _stratified_test(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each row is held out: ``fraction`` of every class, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        test[rows[: round(fraction * len(rows))]] = True
    return test


def _digit_image_rows(split: str, size: int) -> Iterator[Rows]:
    """The 8x8 digits as 1x8x8 images on [0, 1]; 20 % of each class held out."""
    with gzip.open(_digits_file(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = (table[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    labels = table[:, 64].astype(np.int64)
    test = _stratified_test(labels, 0.2, _DIGITS_SEED)
    keep = test if split == "test" else ~test
    yield images[keep], labels[keep]


_GRAMMAR_MIN_TEST_CHARS = 20_000


def _grammar_text(split: str, size: int) -> str:
    """``size`` characters to train on, then the text that follows them held out."""
    held_out = max(_GRAMMAR_MIN_TEST_CHARS, size // 10)
    if split == "train":
        return generated_corpus(size)
    return generated_corpus(size + held_out)[size:]


# The teacher. Its first layer only sees a few directions of the input and its hidden layers
# have biases and a gain above 1: without these a random tanh network is nearly linear, and a
# linear model would score almost as well as a deep one, which defeats the benchmark.
_TEACHER_SEED = 20_240_611
_TEACHER_FEATURES = 32
_TEACHER_CLASSES = 10
_TEACHER_WIDTH = 64
_TEACHER_DEPTH = 3
_TEACHER_RANK = 4
_TEACHER_GAIN = 2.0
_TEACHER_BIAS = 1.0
_CALIBRATION_ROWS = 50_000
_CHUNK_ROWS = 16384


@dataclass(frozen=True)
class _Teacher:
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    readout: np.ndarray
    centre: np.ndarray  # per-class logit mean and spread on a calibration sample,
    spread: np.ndarray  # so no class dominates by scale alone
    offset: np.ndarray  # then nudged until the classes come out balanced

    def scores(self, x: np.ndarray) -> np.ndarray:
        h = x.astype(np.float64)
        for weight, bias in self.layers:
            h = np.tanh(h @ weight + bias)
        return h @ self.readout

    def labels(self, x: np.ndarray) -> np.ndarray:
        standard = (self.scores(x) - self.centre) / self.spread
        return (standard - self.offset).argmax(axis=1).astype(np.int64)


@functools.cache
def _teacher() -> _Teacher:
    rng = np.random.default_rng([_TEACHER_SEED, 0])
    basis = np.linalg.qr(rng.standard_normal((_TEACHER_FEATURES, _TEACHER_RANK)))[0]
    first = basis @ rng.standard_normal((_TEACHER_RANK, _TEACHER_WIDTH)) / np.sqrt(_TEACHER_RANK)
    weights = [first] + [
        rng.standard_normal((_TEACHER_WIDTH, _TEACHER_WIDTH)) / np.sqrt(_TEACHER_WIDTH)
        for _ in range(_TEACHER_DEPTH - 1)
    ]
    layers = tuple(
        (_TEACHER_GAIN * w, _TEACHER_BIAS * rng.standard_normal(_TEACHER_WIDTH)) for w in weights
    )
    readout = rng.standard_normal((_TEACHER_WIDTH, _TEACHER_CLASSES)) / np.sqrt(_TEACHER_WIDTH)
    ones = np.ones(_TEACHER_CLASSES)
    raw = _Teacher(layers, readout, np.zeros(_TEACHER_CLASSES), ones, np.zeros(_TEACHER_CLASSES))
    scores = raw.scores(rng.standard_normal((_CALIBRATION_ROWS, _TEACHER_FEATURES)))
    centre, spread = scores.mean(axis=0), scores.std(axis=0)
    offset = _balancing_offset((scores - centre) / spread)
    return _Teacher(layers, readout, centre, spread, offset)


def _balancing_offset(scores: np.ndarray, rounds: int = 50) -> np.ndarray:
    """Offsets that make each class win about equally often, found by damped log-ratio steps."""
    classes = scores.shape[1]
    offset = np.zeros(classes)
    for _ in range(rounds):
        share = np.bincount((scores - offset).argmax(axis=1), minlength=classes) / len(scores)
        offset += 0.1 * np.log(np.maximum(share, 1e-3) * classes)
    return offset


def _teacher_rows(split: str, size: int) -> Iterator[Rows]:
    """Chunks drawn in sequence from one generator per split: a smaller dataset is a prefix."""
    count = size if split == "train" else max(2000, size // 10)
    rng = np.random.default_rng([_TEACHER_SEED, SPLITS.index(split) + 1])
    teacher = _teacher()
    for start in range(0, count, _CHUNK_ROWS):
        rows = min(_CHUNK_ROWS, count - start)
        x = rng.standard_normal((rows, _TEACHER_FEATURES)).astype(np.float32)
        yield x, teacher.labels(x)


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "digits": BuiltinDataset(
        name="digits",
        description="scikit-learn's 8x8 handwritten digits: 1797 images, 64 features, "
        "10 classes, fixed 80/20 split",
        kind="table",
        shape=(64,),
        num_classes=10,
        default_size=1797,
        fixed_size=True,
        rows=_digits_rows,
    ),
    "digits-images": BuiltinDataset(
        name="digits-images",
        description="the same UCI handwritten digits as 1x8x8 images for conv nets: 1797 "
        "images, 10 classes, fixed 80/20 split stratified by class",
        kind="image",
        shape=(1, 8, 8),
        num_classes=10,
        default_size=1797,
        fixed_size=True,
        rows=_digit_image_rows,
        crop_padding=1,  # an eighth of the side, as 4 px is of CIFAR's 32
        flip=False,  # a mirrored digit is not a digit
    ),
    "teacher": BuiltinDataset(
        name="teacher",
        description="Gaussian inputs (32 features) labelled by a fixed random deep tanh "
        "network into 10 balanced classes; rewards depth (default 200000 train rows)",
        kind="table",
        shape=(_TEACHER_FEATURES,),
        num_classes=_TEACHER_CLASSES,
        default_size=200_000,
        fixed_size=False,
        rows=_teacher_rows,
    ),
    "grammar": BuiltinDataset(
        name="grammar",
        description="English-like sentences of a small seeded grammar as UTF-8 text for "
        "language models (default 200000 train characters, data.size sets it; the next "
        "tenth, at least 20000, held out)",
        kind="tokens",
        shape=(),
        num_classes=256,
        default_size=200_000,
        fixed_size=False,
        text=_grammar_text,
    ),
}
