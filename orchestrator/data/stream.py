"""Reproducible, memory-bounded batches of any data set: table rows, images, token windows.

The train order is a pure function of (dataset, seed, step): a worker that restarts from a
checkpoint at step t asks for ``batch(t)`` and sees exactly the batches it would have seen had
it never stopped, without decoding the examples it skips. What one batch holds:

* table: x float32 [B, F], y int64 [B];
* image: x float32 [B, C, H, W], normalised per channel (train batches augmented), y int64 [B];
* tokens: x int64 [B, T], y int64 [B, T], the next token at every position.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Literal

import torch

from orchestrator.data.parquet_rows import ParquetRows
from orchestrator.data.rows import Rows
from orchestrator.data.source import DatasetInfo
from orchestrator.data.token_windows import TokenWindows
from orchestrator.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchStream:
    """Batches of one split: ``batch(t)`` for training, iteration for evaluation.

    The examples come from ``ParquetRows`` (tables, images) or ``TokenWindows`` (text); this
    class adds what both share: steps counted across epochs and reading ahead.
    """

    def __init__(
        self,
        info: DatasetInfo,
        split: Literal["train", "test"],
        batch_size: int,
        seed: int,
        shuffle_window: int = 4,
    ) -> None:
        self._split = split
        self._batch_size = batch_size
        self._examples: ParquetRows | TokenWindows
        if info.tokens is not None:
            self._examples = TokenWindows(info, split, batch_size, seed)
        else:
            self._examples = ParquetRows(info, split, batch_size, seed, shuffle_window)
        self._cursor: Iterator[Batch] | None = None
        self._next_step = 0
        self._ready: deque[Batch] = deque()  # batches the reader thread has cut
        self._ahead: Future[list[Batch]] | None = None  # the ones it is cutting
        self._reader: ThreadPoolExecutor | None = None
        if split == "train" and self._examples.count < batch_size:
            raise ConfigError(
                f"data.batch_size: {batch_size} is larger than the {self._examples.count} "
                f"training {self._examples.unit} of {info.name}; lower data.batch_size"
            )

    @property
    def batches_per_epoch(self) -> int:
        self._require("train", "batches_per_epoch")
        return self._examples.count // self._batch_size

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
            self._cursor = _as_tensors(self._examples.from_step(t))
            return next(self._cursor)
        if not self._ready:
            cursor = self._cursor
            self._ready.extend(self._ahead.result() if self._ahead else [next(cursor)])
            self._reader = self._reader or ThreadPoolExecutor(1, "batch-reader")
            self._ahead = self._reader.submit(list, islice(cursor, self._examples.batches_per_read))
        return self._ready.popleft()

    def _drop_read_ahead(self) -> None:
        """Forget what was read ahead for another position (a read under way finishes
        unused: it advances the old iterator, which the caller no longer holds)."""
        self._ready.clear()
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None

    def __iter__(self) -> Iterator[Batch]:
        """One pass in stored order, keeping the last partial batch, as evaluation needs."""
        return _as_tensors(self._examples.in_order())

    def _require(self, split: str, what: str) -> None:
        if self._split != split:
            raise ValueError(f"{what} is only defined for the {split} split")


def _as_tensors(pieces: Iterator[Rows]) -> Iterator[Batch]:
    """Copies, so a batch a caller keeps does not pin the whole window it was cut from."""
    for x, y in pieces:
        yield torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
