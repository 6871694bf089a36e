"""Reproducible, memory-bounded batches streamed from Parquet row groups.

The train order is a pure function of (dataset, seed, step): a worker that restarts from a
checkpoint at step t asks for ``batch(t)`` and sees exactly the batches it would have seen had
it never stopped, without decoding the rows it skips.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch

from orchestrator.data import files
from orchestrator.data.rows import Rows, rebatch
from orchestrator.data.source import DatasetInfo
from orchestrator.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]

# Salts keep the random streams apart: the split rule, the fragment order, the window shuffles.
_SPLIT_SALT = 0x5EED_DA7A_0F_7E57
_ORDER_SALT = 1
_WINDOW_SALT = 2


def held_out(positions: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each row, by its position in the unshuffled data, belongs to the test split.

    A fixed hash (splitmix64) of the position rather than a random draw, so any process can
    decide a row's side from its position alone, and train and test streams always agree.
    """
    z = positions.astype(np.uint64) + np.uint64(_SPLIT_SALT)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


@dataclass(frozen=True)
class _Fragment:
    """One row group, the unit that is shuffled, skipped or read."""

    source: ds.ParquetFileFragment
    offset: int  # global position of its first row in the unshuffled data
    size: int  # rows stored
    rows: int  # rows this split takes from it


class BatchStream:
    """Batches of one split: ``batch(t)`` for training, iteration for evaluation.

    Train order: epoch e permutes the row groups with a generator seeded from (seed, e), then
    shuffles rows within each window of ``shuffle_window`` consecutive row groups, so memory
    is bounded by the window whatever the dataset size. Each epoch drops its last partial
    batch, making every epoch exactly ``batches_per_epoch`` long.
    """

    def __init__(
        self,
        info: DatasetInfo,
        split: Literal["train", "test"],
        batch_size: int,
        seed: int,
        shuffle_window: int = 4,
    ) -> None:
        self._info = info
        self._split = split
        self._batch_size = batch_size
        self._seed = seed
        self._window = shuffle_window
        self._splitting = info.test is None
        held_out_file = info.test if split == "test" else None
        self._fragments = self._list_fragments(held_out_file or info.train)
        self._rows = sum(fragment.rows for fragment in self._fragments)
        self._cursor: Iterator[Batch] | None = None
        self._next_step = 0
        self._ready: deque[Batch] = deque()  # batches the reader thread has cut
        self._ahead: Future[list[Batch]] | None = None  # the ones it is cutting
        self._reader: ThreadPoolExecutor | None = None
        if split == "train" and self._rows < batch_size:
            raise ConfigError(
                f"data.batch_size: {batch_size} is larger than the {self._rows} training rows "
                f"of {info.name}; lower data.batch_size"
            )

    @property
    def batches_per_epoch(self) -> int:
        self._require("train", "batches_per_epoch")
        return self._rows // self._batch_size

    def batch(self, t: int) -> Batch:
        """The t-th train batch counted across epochs; sequential calls reuse one iterator.

        Once the calls are sequential, a reader thread cuts the next window's worth of
        batches (reading, decoding and shuffling its rows) while the caller trains on these:
        the data leaves the critical path, and the caller only pops a ready batch. A first
        call or a jump reads, on the caller's thread, only what it returns. The iterator is
        the same either way, and so are the batches.
        """
        self._require("train", "batch()")
        if t < 0:
            raise ValueError(f"batch index must be >= 0, got {t}")
        sequential = self._cursor is not None and t == self._next_step
        self._next_step = t + 1
        if not sequential:
            self._drop_read_ahead()
            self._cursor = self._from_step(t)
            return next(self._cursor)
        if not self._ready:
            cursor = self._cursor
            self._ready.extend(self._ahead.result() if self._ahead else [next(cursor)])
            self._reader = self._reader or ThreadPoolExecutor(1, "batch-reader")
            self._ahead = self._reader.submit(list, islice(cursor, self._batches_per_read))
        return self._ready.popleft()

    @property
    def _batches_per_read(self) -> int:
        """About one window of rows: the reader's share of work matches the caller's."""
        windows = -(-len(self._fragments) // self._window)
        return max(1, self._rows // windows // self._batch_size)

    def _drop_read_ahead(self) -> None:
        """Forget what was read ahead for another position (a read under way finishes
        unused: it advances the old iterator, which the caller no longer holds)."""
        self._ready.clear()
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None

    def __iter__(self) -> Iterator[Batch]:
        """One pass in stored order, keeping the last partial batch, as evaluation needs."""
        chunks = (self._read([fragment]) for fragment in self._fragments if fragment.rows)
        return _as_tensors(rebatch(chunks, self._batch_size, keep_last=True))

    def _require(self, split: str, what: str) -> None:
        if self._split != split:
            raise ValueError(f"{what} is only defined for the {split} split")

    def _list_fragments(self, location: str) -> list[_Fragment]:
        fs, path = files.resolve(location)
        dataset = ds.dataset(files.parquet_files(fs, path), format="parquet", filesystem=fs)
        fragments, offset = [], 0
        for file_fragment in dataset.get_fragments():
            for piece in file_fragment.split_by_row_group():
                size = piece.row_groups[0].num_rows
                keep = self._keep(offset, size)
                rows = size if keep is None else int(keep.sum())
                fragments.append(_Fragment(piece, offset, size, rows))
                offset += size
        return fragments

    def _keep(self, offset: int, size: int) -> np.ndarray | None:
        """Which of these rows this split takes; None when it takes them all."""
        if not self._splitting:
            return None
        test = held_out(np.arange(offset, offset + size), self._info.test_fraction)
        return test if self._split == "test" else ~test

    def _from_step(self, t: int) -> Iterator[Batch]:
        epoch, first = divmod(t, self.batches_per_epoch)
        while True:
            windows = self._windows(epoch, skip=first * self._batch_size)
            yield from _as_tensors(rebatch(windows, self._batch_size, keep_last=False))
            epoch, first = epoch + 1, 0

    def _windows(self, epoch: int, skip: int) -> Iterator[Rows]:
        """Shuffled windows of one epoch, minus its first ``skip`` rows.

        Windows lying wholly inside the skipped rows are passed over by their row counts,
        unread; each window has its own generator, so skipping does not change later ones.
        """
        order_rng = np.random.default_rng([_ORDER_SALT, self._seed, epoch])
        order = order_rng.permutation(len(self._fragments))
        for start in range(0, len(order), self._window):
            window = [self._fragments[i] for i in order[start : start + self._window]]
            rows = sum(fragment.rows for fragment in window)
            if skip >= rows:
                skip -= rows
                continue
            x, y = self._read(window)
            shuffle_rng = np.random.default_rng([_WINDOW_SALT, self._seed, epoch, start])
            keep = shuffle_rng.permutation(rows)[skip:]
            skip = 0
            yield x[keep], y[keep]

    def _read(self, fragments: list[_Fragment]) -> Rows:
        columns = [*self._info.features, self._info.label]
        xs, ys = [], []
        for fragment in fragments:
            table = fragment.source.to_table(columns=columns, use_threads=False)
            x = _feature_matrix(table, self._info.features)
            y = _label_vector(table, self._info.label, self._info.num_classes)
            keep = self._keep(fragment.offset, fragment.size)
            xs.append(x if keep is None else x[keep])
            ys.append(y if keep is None else y[keep])
        return np.concatenate(xs), np.concatenate(ys)


def _feature_matrix(table: pa.Table, features: Iterable[str]) -> np.ndarray:
    parts = []
    for name in features:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            values = column.flatten()
            if column.null_count or values.null_count:
                raise ConfigError(f"data.features: column {name!r} has missing values")
            width = column.type.list_size
            parts.append(values.to_numpy(zero_copy_only=False).reshape(-1, width))
        else:
            if column.null_count:
                raise ConfigError(f"data.features: column {name!r} has missing values")
            parts.append(column.to_numpy(zero_copy_only=False).reshape(-1, 1))
    return np.concatenate(parts, axis=1, dtype=np.float32)


def _label_vector(table: pa.Table, label: str, num_classes: int) -> np.ndarray:
    column = table.column(label)
    if column.null_count:
        raise ConfigError(f"data.label: column {label!r} has missing values")
    y = column.to_numpy().astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            f"data.label: column {label!r} holds labels from {y.min()} to {y.max()}, outside "
            f"0..{num_classes - 1}; fix the labels or raise data.num_classes"
        )
    return y


def _as_tensors(pieces: Iterator[Rows]) -> Iterator[Batch]:
    """Copies, so a batch a caller keeps does not pin the whole window it was cut from."""
    for x, y in pieces:
        yield torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
