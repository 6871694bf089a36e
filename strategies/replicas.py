"""Keeping data-parallel replicas identical while only small things travel: what EGGROLL
and the zeroth-order strategy share. Every replica applies the same update from seeds and
scalars, so the updates must round the same everywhere (``single_thread``), a digest tells
when one drifted (``parameter_checksum``), work is split in contiguous shards (``shards``)
and the bytes that cross the network are counted (``payload_bytes``)."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


def shards(total: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ranges of ``total`` items, sizes differing by at most one."""
    bounds = np.linspace(0, total, workers + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def payload_bytes(*values: Any) -> int:
    """Bytes of the pickled arguments or results: what crosses the network, give or take
    Ray's own framing (which does not grow with the model)."""
    return sum(len(pickle.dumps(v, protocol=5)) for v in values)


def parameter_checksum(params: Sequence[torch.Tensor]) -> str:
    """A digest of the exact bytes: workers that drifted apart disagree on it."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """The update must be bit-identical on every replica; a BLAS reduction split over a
    different number of threads rounds differently, so updates run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
