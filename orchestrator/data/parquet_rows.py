"""Rows of tables and images, read from Parquet row groups in a reproducible order.

Train order: epoch e permutes the row groups with a generator seeded from (seed, e), then
shuffles rows within each window of ``shuffle_window`` consecutive row groups, so memory is
bounded by the window whatever the dataset size. Images are decoded as their row groups are
read (on the stream's reader thread, in the worker), and augmented per batch with a generator
of (seed, epoch, batch), so a resumed run sees the very same pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from orchestrator.data import files, images
from orchestrator.data.rows import Rows, rebatch
from orchestrator.data.source import DatasetInfo
from orchestrator.data.split import held_out
from orchestrator.errors import ConfigError

# Salts keep the random streams apart: the fragment order, the window shuffles.
_ORDER_SALT = 1
_WINDOW_SALT = 2


@dataclass(frozen=True)
class _Fragment:
    """One row group, the unit that is shuffled, skipped or read."""

    source: ds.ParquetFileFragment
    offset: int  # global position of its first row in the unshuffled data
    size: int  # rows stored
    rows: int  # rows this split takes from it


class ParquetRows:
    """The rows of one split as numpy batches: features [B, F] or pixels [B, C, H, W] (float32,
    normalised), and labels [B] (int64)."""

    unit = "rows"

    def __init__(
        self,
        info: DatasetInfo,
        split: Literal["train", "test"],
        batch_size: int,
        seed: int,
        shuffle_window: int,
    ) -> None:
        self._info = info
        self._split = split
        self._batch_size = batch_size
        self._seed = seed
        self._window = shuffle_window
        self._splitting = info.test is None
        held_out_file = info.test if split == "test" else None
        self._fragments = self._list_fragments(held_out_file or info.train)
        self.count = sum(fragment.rows for fragment in self._fragments)

    @property
    def batches_per_read(self) -> int:
        """About one window of rows: the reader's share of work matches the caller's."""
        windows = -(-len(self._fragments) // self._window)
        return max(1, self.count // windows // self._batch_size)

    def from_step(self, t: int) -> Iterator[Rows]:
        """Train batches from the t-th on, across epochs; each epoch drops its last partial
        batch, making every epoch exactly count // batch_size long."""
        epoch, first = divmod(t, self.count // self._batch_size)
        while True:
            windows = self._windows(epoch, skip=first * self._batch_size)
            pieces = rebatch(windows, self._batch_size, keep_last=False)
            for index, (x, y) in enumerate(pieces, start=first):
                yield self._prepared(x, (epoch, index)), y
            epoch, first = epoch + 1, 0

    def in_order(self) -> Iterator[Rows]:
        """One pass in stored order, keeping the last partial batch, as evaluation needs."""
        chunks = (self._read([fragment]) for fragment in self._fragments if fragment.rows)
        for x, y in rebatch(chunks, self._batch_size, keep_last=True):
            yield self._prepared(x, None), y

    def _prepared(self, x: np.ndarray, position: tuple[int, int] | None) -> np.ndarray:
        """Pixels to normalised float32, augmented when ``position`` (epoch, batch) is given."""
        layout = self._info.image
        if layout is None:
            return x
        pixels = images.to_unit_scale(x)
        if position is not None and layout.crop_padding is not None:
            rng = images.augmentation_rng(self._seed, *position)
            pixels = images.random_crop_flip(pixels, rng, layout.crop_padding, layout.flip)
        return images.normalise(pixels, layout.mean, layout.std)

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
        layout = self._info.image
        examples = [layout.column] if layout else list(self._info.features)
        xs, ys = [], []
        for fragment in fragments:
            table = fragment.source.to_table(
                columns=[*examples, self._info.label], use_threads=False
            )
            if layout is None:
                x = _feature_matrix(table, self._info.features)
            else:
                x = images.decode(
                    table.column(layout.column), layout.storage, layout.shape, layout.column
                )
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
