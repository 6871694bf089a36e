"""What one block hands the next, through the Ray object store or a compiled graph's channel.

One message carries several batches (``batches_per_call``): a call costs the same
scheduling whatever it carries, so a small model pays it once per few batches. Tensors
travel as NumPy arrays: Ray stores those in shared memory and hands the reader a
zero-copy view, where a pickled torch tensor is copied on both sides (measured in
`benchmarks.pipeline`: about 40 % less time per 2 MB hop); a compiled graph's
shared-memory channel likewise hands the reader read-only views. Between GPU workers in
a compiled graph the tensors stay on the device (``on_device``) and go over NCCL.
Per-block statistics ride along with the activations, so the driver learns every block's
numbers from the last block's small reply, without a call per block and without the
activations ever passing through it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch


@dataclass(frozen=True)
class BlockRecord:
    block: int
    loss: float
    correct: int
    count: int
    start: float
    end: float
    applied: bool = True  # False: run.nonfinite: skip dropped the block's update on it
    skipped: int = 0  # optimizer steps the block dropped on it (0 or 1)


def to_wire(tensor: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A CPU NumPy view where NumPy has the dtype; otherwise (bfloat16) the tensor itself."""
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        return tensor
    return tensor.contiguous().numpy()


def on_device(tensor: torch.Tensor) -> torch.Tensor:
    """The detached tensor where it is, for a transport that moves device tensors itself
    (a compiled graph's NCCL edge between GPU workers)."""
    return tensor.detach()


def from_wire(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The object store's arrays are read-only views; blocks only read their inputs."""
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(value)


Mode = Literal["train", "eval"]
Wire = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class BatchRange:
    """What the driver sends the first block: which batches it reads itself, and why."""

    mode: Mode
    first: int
    count: int


@dataclass
class Activations:
    """One call's batches on their way up the pipe: after the last block, only the records.

    ``records[i]`` is batch i's chain, one record per block it has passed.
    """

    mode: Mode
    hidden: list[Wire] = field(default_factory=list)
    labels: list[Wire] = field(default_factory=list)
    records: list[list[BlockRecord]] = field(default_factory=list)
    carries: list[Wire | None] = field(default_factory=list)
    """Per batch, what the rule passes beside the activations when evaluating (empty, or
    ``None`` each, for cross-entropy blocks)."""
