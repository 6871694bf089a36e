"""What a worker measures about itself: busy intervals and peak training memory."""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from strategies.engines.offload import layered_saved_tensors_hooks


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
    parameters: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer | None
) -> int:
    """Parameters + gradients + optimizer state, the memory that lives across steps.

    A gradient is counted for every parameter whether or not it is set right now: the
    step had it (a worker that frees gradients after its update held them during it).
    """
    total = sum(2 * _tensor_bytes(p) for p in parameters)
    for state in optimizer.state.values() if optimizer is not None else ():
        total += sum(_tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


class _LiveTensors(TorchDispatchMode):
    """Bytes of the tensors that operators allocate while the mode is on, as long as they
    live (a weak reference on each new storage notices its release). Views and in-place
    results share a storage their inputs already had: they allocate nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.peak = 0
        self.storages: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = tree_leaves((args, kwargs))
        known = {id(t.untyped_storage()) for t in inputs if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in known or key in self.storages:
                continue
            size = storage.nbytes()
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
            self.storages[key] = weakref.ref(storage, self._released(key, size))
        return out

    def _released(self, key: int, size: int):  # noqa: ANN202
        def release(_: weakref.ref) -> None:
            self.bytes -= size
            self.storages.pop(key, None)

        return release


class StepMemory:
    """Peak training bytes: the most memory one training step of a worker needs at once.

    On CUDA the allocator knows: its peak over the step is the figure. A CPU has no such
    counter, so the step's tensors are accounted, the same way for every worker:

    * what the worker holds across the step: parameters, their gradients (an ES gradient
      too), the optimizer's state, and inputs it keeps between calls (an expert's task);
    * in the parts autograd records (``backprop``): every tensor it saves for the backward
      pass. They are all alive when backward starts, so the figure is their sum;
    * in the parts without a backward pass (``inference``: EGGROLL's population forward
      with its noise factors, an expert's solve and adjoint solve): nothing is kept for a
      backward, so what the part holds is what it has allocated and not yet freed,
      followed per storage by a dispatch mode; the figure is the peak of that.

    Under autograd an operator's transient result, freed as soon as the next one has read
    it, is left out: it is bounded by one layer, while the saved activations grow with
    depth and batch and are what local learning saves on (the pipeline benchmark's memory
    ratio). Only torch's tensors are counted, not the interpreter or a simulator. The
    first step is measured (later ones have the same shapes); parts after ``finish`` run
    untouched.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak: int | None = None
        self.saved = 0
        self.live = _LiveTensors()
        self.started = False

    @property
    def measuring(self) -> bool:
        return self.peak is None

    def _counting(self) -> bool:
        """Start measuring the step (once); whether this part's tensors are counted here
        (not once the step is measured, nor on CUDA, whose allocator counts them)."""
        if not self.measuring:
            return False
        if self.cuda and not self.started:
            torch.cuda.reset_peak_memory_stats()
        self.started = True
        return not self.cuda

    @contextmanager
    def backprop(self) -> Iterator[None]:
        """A part of the step that autograd records."""
        if not self._counting():
            yield
            return

        def pack(saved: object) -> object:
            if isinstance(saved, torch.Tensor):  # not an offloaded activation's handle
                self.saved += _tensor_bytes(saved)
            return saved

        with layered_saved_tensors_hooks(pack, lambda saved: saved):
            yield

    @contextmanager
    def inference(self) -> Iterator[None]:
        """A part of the step with no backward pass."""
        if not self._counting():
            yield
            return
        with self.live:
            yield

    def finish(
        self,
        parameters: Iterable[torch.Tensor] = (),
        optimizer: torch.optim.Optimizer | None = None,
        held: Iterable[torch.Tensor] = (),
    ) -> None:
        """The step is over: record its peak (once; later calls do nothing)."""
        if not self.measuring:
            return
        if self.cuda:
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            state = model_state_bytes(parameters, optimizer) + sum(map(_tensor_bytes, held))
            self.peak = state + self.saved + self.live.peak
        self.live.storages.clear()  # drop the weak references: nothing is counted any more
