"""Activation offloading, after SSDTrain (Wu et al., 2024): the tensors autograd saves for
the backward pass leave the worker's memory while the forward goes on, and come back
when the backward needs them.

``ActivationOffload.saving()`` installs ``torch.autograd.graph.saved_tensors_hooks``:

* pack: a saved tensor of at least ``min_bytes`` that is not a parameter starts an
  asynchronous copy (to pinned host memory on a CUDA side stream, or to a file written by a
  background thread) and autograd keeps a handle instead of the tensor; small tensors,
  parameters (and views of them: the optimizer holds them anyway) and non-contiguous
  tensors stay as they are. A tensor saved twice (a ReLU's output is the next layer's
  input) is sent once: the second save gets the first one's handle (the paper's
  deduplication);
* unpack: waits for the copy back (prefetched where possible) and returns the tensor. A
  tensor whose write has not finished is still in memory and is returned as it is (the
  paper's "forwarding"), so a short forward never waits on the disk.

When the forward's context closes the backward is about to start, with the last-saved
tensors: those are read back first, and every unpack starts reading the next ones (in
reverse save order) so the disk works while autograd computes. At most ``WINDOW``
tensors are read ahead, and at most ``WINDOW`` copies out are unfinished during the
forward (on a GPU, whose forward outruns PCIe, the device memory of a tensor is free only
once its copy is done).
A file lives as long as its handle: autograd drops the handle when the graph is freed
(after the backward, or later with ``retain_graph``); ``close`` removes what remains.

``layered_saved_tensors_hooks`` composes hook pairs: torch applies only the innermost
pair, so a meter that counts saved bytes outside the offload (workers.telemetry) would see
nothing. Each layer's pack receives what the layer inside it returned, a tensor still in
memory or an offload handle, so the meter counts only what stays.

Pure torch, no Ray: each worker builds its own from its engine config.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

WINDOW = 2
"""Tensors on their way each way: read back ahead of the backward, and sent but not yet on
disk or in host memory (a pack waits for the oldest copy beyond it). Enough to hide one
transfer behind one layer's compute, few enough that the worker holds little more than the
layer it is in, so what stays in memory is what the kept tensors add up to."""

Pack = Callable[[Any], Any]
Unpack = Callable[[Any], Any]

_layers = threading.local()


@contextlib.contextmanager
def layered_saved_tensors_hooks(pack: Pack, unpack: Unpack) -> Iterator[None]:
    """``saved_tensors_hooks(pack, unpack)`` that keeps the pairs already installed by this
    function: a saved tensor goes through the innermost pack first, then outward, and
    comes back through the unpacks in the opposite order."""
    outer: list[tuple[Pack, Unpack]] = getattr(_layers, "stack", [])
    stack = [*outer, (pack, unpack)]

    def pack_all(value: Any) -> Any:
        for layer_pack, _ in reversed(stack):
            value = layer_pack(value)
        return value

    def unpack_all(value: Any) -> Any:
        for _, layer_unpack in stack:
            value = layer_unpack(value)
        return value

    _layers.stack = stack
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack_all, unpack_all):
            yield
    finally:
        _layers.stack = outer


def is_parameter(tensor: torch.Tensor) -> bool:
    """A learnable leaf or a view of one (``linear`` saves ``weight.t()``): kept in
    memory, since the module holds it whatever autograd does."""
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad)


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 tensor (any dtype, bf16 included)."""
    return tensor.detach().reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class _Layout:
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


class _Staged:
    """The tensor (in host memory) while its file is being written; emptied once written,
    so its memory goes as soon as the disk has it. Holds nothing that points back at its
    handle: the handle's finalizer must be able to run."""

    def __init__(self, host: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        self.host: torch.Tensor | None = host
        self.ready = ready  # the device-to-host copy feeding ``host`` (CUDA only)


def _write(staged: _Staged, path: Path) -> None:
    if staged.ready is not None:
        staged.ready.synchronize()
    with open(path, "wb", buffering=0) as file:  # FileIO releases the GIL while it writes
        file.write(_byte_view(staged.host).numpy().data)
    staged.host = None


def _read(path: Path, layout: _Layout, written: Future[None]) -> torch.Tensor:
    written.result()
    pinned = layout.device.type == "cuda"
    raw = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pinned)
    with open(path, "rb", buffering=0) as file:
        file.readinto(raw.numpy().data)
    return raw.view(layout.dtype).reshape(layout.shape)


def _remove_when_written(written: Future[None], path: Path) -> None:
    written.add_done_callback(lambda _: path.unlink(missing_ok=True))


class _CudaCopies:
    """Copies between a device and pinned host memory on one side stream, ordered against
    the compute stream by events, so they overlap the forward and the backward."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # tensor is ready
        with torch.cuda.stream(self.stream):
            host.copy_(tensor.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy ends
        return host, done

    def to_device(
        self, host: torch.Tensor, device: torch.device, after: torch.cuda.Event | None = None
    ) -> tuple[torch.Tensor, torch.cuda.Event]:
        out = torch.empty(host.shape, dtype=host.dtype, device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # out's memory is free
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            out.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        out.record_stream(self.stream)
        return out, done


class _Offloaded(ABC):
    """What autograd keeps in place of an offloaded tensor."""

    def __init__(self, sequence: int, layout: _Layout) -> None:
        self.sequence = sequence
        self.layout = layout

    @abstractmethod
    def prefetch(self) -> None:
        """Start bringing the tensor back, if it is not on its way already."""

    @abstractmethod
    def load(self) -> torch.Tensor:
        """The tensor, in the memory it was saved from."""


class _OnHost(_Offloaded):
    def __init__(self, sequence: int, tensor: torch.Tensor, copies: _CudaCopies) -> None:
        super().__init__(sequence, _Layout(tensor.shape, tensor.dtype, tensor.device))
        self.copies = copies
        self.host, self.saved = copies.to_host(tensor)
        self.back: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def prefetch(self) -> None:
        if self.back is None:
            self.back = self.copies.to_device(self.host, self.layout.device, self.saved)

    def load(self) -> torch.Tensor:
        self.prefetch()
        assert self.back is not None
        tensor, done = self.back
        self.back = None  # a second unpack (retain_graph) copies again; none is held here
        torch.cuda.current_stream(self.layout.device).wait_event(done)
        return tensor


class _OnDisk(_Offloaded):
    def __init__(
        self,
        sequence: int,
        tensor: torch.Tensor,
        path: Path,
        writer: ThreadPoolExecutor,
        reader: ThreadPoolExecutor,
        copies: _CudaCopies | None,
    ) -> None:
        super().__init__(sequence, _Layout(tensor.shape, tensor.dtype, tensor.device))
        self.path, self.reader, self.copies = path, reader, copies
        if copies is None:
            self.staged = _Staged(tensor.detach(), None)
        else:
            self.staged = _Staged(*copies.to_host(tensor))
        self.written: Future[None] = writer.submit(_write, self.staged, path)
        self.read: Future[torch.Tensor] | None = None
        weakref.finalize(self, _remove_when_written, self.written, path)

    def prefetch(self) -> None:
        if self.read is None and self.staged.host is None:
            self.read = self.reader.submit(_read, self.path, self.layout, self.written)

    def load(self) -> torch.Tensor:
        host, ready = self.staged.host, self.staged.ready
        if host is None:  # on disk: read it (unless a prefetch already is)
            self.prefetch()
            assert self.read is not None
            host, ready, self.read = self.read.result(), None, None
        # else not written yet, still in memory: no need to wait for the disk ("forwarding")
        if self.copies is None:
            return host
        tensor, done = self.copies.to_device(host, self.layout.device, ready)
        torch.cuda.current_stream(self.layout.device).wait_event(done)
        return tensor


class ActivationOffload:
    """Offloads what autograd saves inside ``saving()`` to ``where`` ("host": pinned host
    memory, CUDA only; "disk": files under a fresh directory in ``directory``, or the
    system's temporary directory). ``min_bytes``: smaller tensors are not worth the trip."""

    def __init__(
        self,
        where: Literal["host", "disk"],
        device: torch.device | str,
        min_bytes: int,
        directory: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        if where == "host" and self.device.type != "cuda":
            raise ValueError(
                f"offloading to host memory from device {str(self.device)!r} saves nothing "
                "(the activations are in host memory already); offload to disk instead"
            )
        self.where = where
        self.min_bytes = min_bytes
        self.copies = _CudaCopies(self.device) if self.device.type == "cuda" else None
        self.directory: Path | None = None
        if where == "disk":
            self.directory = Path(tempfile.mkdtemp(prefix="unlocked-offload-", dir=directory))
            self.writer = ThreadPoolExecutor(1, thread_name_prefix="offload-write")
            self.reader = ThreadPoolExecutor(1, thread_name_prefix="offload-read")
            self._cleanup = weakref.finalize(
                self, _shutdown, self.writer, self.reader, self.directory
            )
        self.count = 0
        self.sending: deque[tuple[Callable[[], bool], Callable[[], object]]] = deque()
        """(whether it is done, wait for it) of the newest copies out, for the bound."""
        self.live: list[weakref.ref[_Offloaded]] = []
        """Handles in save order, for prefetching; dead ones are dropped as it goes."""
        self.sent: dict[tuple, tuple[weakref.ref, weakref.ref[_Offloaded]]] = {}
        """A live handle by what it holds (storage, view, version), for deduplication."""
        self.offloaded_bytes = 0
        """Bytes sent away since the offload was built (telemetry, tests)."""

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Offload what autograd saves in this block; on leaving it (the backward comes
        next) start reading back the last-saved tensors."""
        with layered_saved_tensors_hooks(self.pack, self.unpack):
            yield
        self._prefetch_before(self.count)

    def keeps(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` stays in memory rather than being offloaded."""
        return (
            tensor.numel() * tensor.element_size() < self.min_bytes
            or tensor.device.type != self.device.type
            or not tensor.is_contiguous()
            or is_parameter(tensor)
        )

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Offloaded:
        if self.keeps(tensor):
            return tensor
        storage = tensor.untyped_storage()
        key = (
            id(storage),
            tensor.storage_offset(),
            tensor.shape,
            tensor.stride(),
            tensor.dtype,
            tensor._version,
        )
        if key in self.sent:  # the same storage (still alive, so not a reused id) and view
            same_storage, sent = self.sent[key]
            handle = sent()
            if same_storage() is storage and handle is not None:
                return handle
        self.count += 1
        if self.where == "host":
            assert self.copies is not None
            handle: _Offloaded = _OnHost(self.count, tensor, self.copies)
            self._bound_sending(handle.saved.query, handle.saved.synchronize)
        else:
            assert self.directory is not None
            path = self.directory / f"{self.count}.bin"
            handle = _OnDisk(self.count, tensor, path, self.writer, self.reader, self.copies)
            self._bound_sending(handle.written.done, handle.written.result)
        self.offloaded_bytes += handle.layout.nbytes
        self.live.append(weakref.ref(handle))
        self.sent[key] = (weakref.ref(storage), weakref.ref(handle))
        return handle

    def _bound_sending(self, done: Callable[[], bool], wait: Callable[[], object]) -> None:
        """Keep at most ``WINDOW`` copies out unfinished: a disk (or a PCIe link) slower
        than the forward would otherwise leave every activation in memory, waiting."""
        self.sending.append((done, wait))
        while len(self.sending) > WINDOW:
            self.sending.popleft()[1]()

    def unpack(self, packed: torch.Tensor | _Offloaded) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        self._prefetch_before(packed.sequence)
        return packed.load()

    def _prefetch_before(self, sequence: int) -> None:
        """Start bringing back the ``WINDOW`` live handles saved last before ``sequence``."""
        self.live = [ref for ref in self.live if ref() is not None]
        self.sent = {key: refs for key, refs in self.sent.items() if refs[1]() is not None}
        started = 0
        for ref in reversed(self.live):
            handle = ref()
            if handle is None or handle.sequence >= sequence:
                continue
            handle.prefetch()
            started += 1
            if started == WINDOW:
                break

    def close(self) -> None:
        """Stop the background threads and remove every file (idempotent)."""
        if self.directory is not None:
            self._cleanup()


def _shutdown(writer: ThreadPoolExecutor, reader: ThreadPoolExecutor, directory: Path) -> None:
    writer.shutdown(wait=True)
    reader.shutdown(wait=True)
    shutil.rmtree(directory, ignore_errors=True)
