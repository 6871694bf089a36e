"""What a worker measures about itself: busy intervals and peak training memory.

Peak memory on a CPU has no allocator counter, so it is accounted from what training
must hold: parameters, gradients, optimizer state, and the activations autograd saves
for the backward pass (counted with saved-tensor hooks). On CUDA the allocator's own
peak is used instead.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")


class BusyTimeline:
    """Wall-clock intervals during which the worker computed; bounded to the newest ones."""

    def __init__(self, keep: int = 512) -> None:
        self.spans: deque[tuple[float, float]] = deque(maxlen=keep)

    @contextmanager
    def busy(self) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.spans.append((start, time.time()))

    def last(self) -> tuple[float, float]:
        return self.spans[-1]


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def model_state_bytes(
    parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> int:
    """Parameters + gradients + optimizer state, the memory that lives across batches."""
    total = sum(2 * _tensor_bytes(p) for p in parameters)
    for state in optimizer.state.values():
        total += sum(_tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def peak_saved_activation_bytes(run_step: Callable[[], object]) -> int:
    """Bytes autograd keeps alive for backward during one training step.

    Counting stops being exact when tensors are saved twice (shared storage), which the
    hooks cannot see; for the layers used here each saved tensor is distinct.
    """
    live = 0
    peak = 0

    def pack(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        nonlocal live, peak
        size = _tensor_bytes(tensor)
        live += size
        peak = max(peak, live)
        return tensor, size

    def unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
        return packed[0]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        run_step()
    return peak


def measured_step(
    run_step: Callable[[], T],
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    device: str,
) -> tuple[T, int]:
    """Run one training step and return its result with the peak bytes it needed."""
    result: list[T] = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        result.append(run_step())
        return result[0], int(torch.cuda.max_memory_allocated())
    activations = peak_saved_activation_bytes(lambda: result.append(run_step()))
    return result[0], activations + model_state_bytes(parameters, optimizer)


class PeakMemory:
    """Peak memory a worker's work needed beyond its start-up.

    CUDA: the allocator's peak. CPU: how far the process's peak resident set (getrusage)
    rose above its peak at construction; it counts everything the process touched,
    torch's workspaces included, which is what a node's memory limit sees.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.baseline = 0 if self.cuda else _peak_resident_bytes()

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        return max(0, _peak_resident_bytes() - self.baseline)


def _peak_resident_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
