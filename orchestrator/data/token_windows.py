"""Fixed-length windows of a token file for language models.

Window i holds tokens [i T, i T + T]: T + 1 tokens, x its first T and y its last T, so each
position's target is the next token and every token but the first is a target exactly once.
Without a test file, whole windows are held out by a hash of their index (as table rows are
by position). A local token file is memory-mapped: a batch reads only its windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np

from orchestrator.data import files
from orchestrator.data.rows import Rows
from orchestrator.data.source import DatasetInfo
from orchestrator.data.split import held_out

_ORDER_SALT = 4  # apart from the row streams' salts


class TokenWindows:
    """The windows of one split as numpy batches: x and y int64 [B, T]."""

    unit = "windows"

    def __init__(
        self, info: DatasetInfo, split: Literal["train", "test"], batch_size: int, seed: int
    ) -> None:
        layout = info.tokens
        assert layout is not None, "a token data set has a token layout"
        self._context = layout.context
        self._batch_size = batch_size
        self._seed = seed
        own_test = split == "test" and info.test is not None
        self._tokens = read_tokens(info.test if own_test else info.train, layout.dtype)
        windows = np.arange((len(self._tokens) - 1) // self._context)
        if info.test is None:
            test = held_out(windows, info.test_fraction)
            windows = windows[test] if split == "test" else windows[~test]
        self._windows = windows
        self.count = len(windows)

    @property
    def batches_per_read(self) -> int:
        return 8  # a batch is a gather from memory: reading ahead only hides the copies

    def from_step(self, t: int) -> Iterator[Rows]:
        """Train batches from the t-th on: epoch e visits the windows in a permutation drawn
        from (seed, e), dropping its last partial batch."""
        per_epoch = self.count // self._batch_size
        epoch, first = divmod(t, per_epoch)
        while True:
            order = np.random.default_rng([_ORDER_SALT, self._seed, epoch]).permutation(self.count)
            for index in range(first, per_epoch):
                chosen = order[index * self._batch_size : (index + 1) * self._batch_size]
                yield self._pairs(self._windows[chosen])
            epoch, first = epoch + 1, 0

    def in_order(self) -> Iterator[Rows]:
        """Every window of the split once, in stored order, the last batch possibly short."""
        for start in range(0, self.count, self._batch_size):
            yield self._pairs(self._windows[start : start + self._batch_size])

    def _pairs(self, windows: np.ndarray) -> Rows:
        index = windows[:, None] * self._context + np.arange(self._context + 1)
        tokens = self._tokens[index].astype(np.int64)
        return tokens[:, :-1], tokens[:, 1:]


def read_tokens(location: str, dtype: str) -> np.ndarray:
    """A token file's ids: memory-mapped when local, read whole from an object store."""
    stored = np.dtype(dtype).newbyteorder("<")
    fs, path = files.resolve(location)
    if not files.is_uri(location):
        return np.memmap(path, dtype=stored, mode="r")
    with fs.open_input_file(path) as handle:
        return np.frombuffer(handle.read(), dtype=stored)
