"""Rows as (features, labels) numpy pairs, re-cut into fixed-size pieces as they stream past."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

Rows = tuple[np.ndarray, np.ndarray]


def rebatch(chunks: Iterable[Rows], size: int, keep_last: bool) -> Iterator[Rows]:
    """Cut a stream of arbitrarily sized chunks into pieces of ``size`` rows.

    Only the chunk in hand and fewer than ``size`` carried-over rows are held, so memory
    follows the chunk size, never the stream length.
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    held = 0
    for x, y in chunks:
        xs.append(x)
        ys.append(y)
        held += len(y)
        if held < size:
            continue
        x, y = np.concatenate(xs), np.concatenate(ys)
        whole = held // size * size
        for start in range(0, whole, size):
            yield x[start : start + size], y[start : start + size]
        xs, ys, held = [x[whole:]], [y[whole:]], held - whole
    if keep_last and held:
        yield np.concatenate(xs), np.concatenate(ys)
