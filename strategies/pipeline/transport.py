"""How the pipeline's driver moves one call's batches through the chain of blocks.

Two transports behind one small interface (``submit`` a message to the first actor,
``receive`` what the last one returns, ``close``):

- ``ObjectStoreTransport``: a chain of ordinary actor calls, ``a1 = b1.forward.remote(m);
  a2 = b2.forward.remote(a1)``; each hop is an object in Ray's object store and each call
  goes through Ray's task scheduling.
- ``CompiledGraphTransport``: one Ray Compiled Graph over the same actors, compiled once.
  Every actor runs a loop that reads its input channel, calls the method and writes its
  output channel: shared-memory channels between CPU actors, NCCL between GPU actors
  (``with_tensor_transport``), so activations go device to device and a call costs no
  task submission. Ray 2.60's channel reader waits by spinning (a ``sched_yield`` loop),
  so on a machine with fewer cores than actors plus the driver the waiting readers take
  cores from the blocks; ``benchmarks.transport`` measures what that costs.

A compiled graph must be torn down before its actors are killed: an actor killed while its
loop runs leaves the other loops reading closed channels. Ray 2.60's teardown also hangs
once a channel has been resized for a message larger than its buffer (``BUFFER_BYTES``).
``close`` therefore tears down in a helper thread and gives up after a timeout, so a stuck
teardown delays the end of a run or a recovery by seconds but never blocks it.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NoReturn

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayChannelError

from strategies.pipeline.config import TransportKind

log = logging.getLogger("unlocked")

CALL_TIMEOUT_S = 300.0
"""Longest a compiled-graph submit or read may wait: one pipeline call is a few batches,
so a wait this long is a hang (a lost actor surfaces sooner, as the actor's error)."""

TEARDOWN_TIMEOUT_S = 10.0

BUFFER_BYTES = 16_000_000
"""Each channel buffer's size. A message larger than its buffer makes Ray 2.60 resize the
channel, and a resized channel's loop then never ends at teardown (measured: 1 MB messages
through the default 1 MB buffers hang ``teardown()``; with the actors' buffers at 16 MB,
1 and 2 MB messages tear down in 15 ms). Memory: buffers x ``max_in_flight`` per edge."""


def _set_buffer_size(actor: Any, size: int) -> None:
    """Runs on an actor: the actor-side size of new and resized channels' buffers (the
    compile argument alone sets the driver's, and does not stop the hang)."""
    from ray.dag import DAGContext

    DAGContext.get_current().buffer_size_bytes = size


class Transport(ABC):
    """Moves a message through a chain of actors, calling ``method`` on each in turn."""

    @abstractmethod
    def submit(self, message: Any) -> Any:
        """Start ``message`` through the chain without waiting; a handle for ``receive``."""

    @abstractmethod
    def receive(self, pending: Any) -> Any:
        """What the last actor returned for ``pending`` (waits for it; raises the actor's
        error if one died)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the transport holds on the actors; they stay alive."""


class ObjectStoreTransport(Transport):
    def __init__(self, actors: Sequence[Any], method: str = "forward") -> None:
        self.methods = [getattr(actor, method) for actor in actors]

    def submit(self, message: Any) -> ray.ObjectRef:
        ref: Any = message
        for method in self.methods:
            ref = method.remote(ref)
        return ref

    def receive(self, pending: ray.ObjectRef) -> Any:
        return ray.get(pending)

    def close(self) -> None:
        """Nothing to release: each call ends by itself."""


class CompiledGraphTransport(Transport):
    """One compiled graph ``input -> actor 0 -> ... -> actor K-1 -> output``.

    ``max_in_flight``: executions submitted and not yet received (the caller's
    backpressure; the graph allocates that many buffers per channel). ``device``:
    ``cuda`` sends the tensors of every actor-to-actor edge over NCCL, so the actors must
    return them on their GPU, one GPU each (NCCL has one rank per device); ``cpu`` pickles
    each message into a shared-memory channel.
    """

    def __init__(
        self,
        actors: Sequence[Any],
        max_in_flight: int,
        device: str = "cpu",
        method: str = "forward",
    ) -> None:
        from ray.dag import InputNode

        ray.get([actor.__ray_call__.remote(_set_buffer_size, BUFFER_BYTES) for actor in actors])
        with InputNode() as message:
            node: Any = message
            for k, actor in enumerate(actors):
                node = getattr(actor, method).bind(node)
                if device == "cuda" and k < len(actors) - 1:
                    node = node.with_tensor_transport(transport="accelerator")
        self.graph = node.experimental_compile(
            _max_inflight_executions=max_in_flight,
            _submit_timeout=CALL_TIMEOUT_S,
            _buffer_size_bytes=BUFFER_BYTES,
        )
        self.closed = False

    def submit(self, message: Any) -> Any:
        try:
            return self.graph.execute(message)
        except RayChannelError as err:
            self._raise_actor_error(err)

    def receive(self, pending: Any) -> Any:
        try:
            return pending.get(timeout=CALL_TIMEOUT_S)
        except RayChannelError as err:
            self._raise_actor_error(err)

    def _raise_actor_error(self, err: RayChannelError) -> NoReturn:
        """A closed channel is how a lost actor shows once Ray's monitor has torn the graph
        down: raise the actor's own error (what recovery acts on) where there is one."""
        loops = list(self.graph.worker_task_refs.values())
        try:
            ray.get(loops, timeout=TEARDOWN_TIMEOUT_S)
        except (RayActorError, ActorUnavailableError) as lost:
            raise lost from err
        raise err

    def close(self, timeout_s: float = TEARDOWN_TIMEOUT_S) -> None:
        if self.closed:
            return
        self.closed = True
        worker = threading.Thread(target=self.graph.teardown, name="cgraph-teardown", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            log.warning(
                "the pipeline's compiled graph did not tear down within %.0f s; "
                "going on (killing its actors ends it)",
                timeout_s,
            )


def open_transport(
    kind: TransportKind,
    actors: Sequence[Any],
    max_in_flight: int,
    device: str = "cpu",
    method: str = "forward",
) -> Transport:
    """The transport ``kind`` (``strategy.transport``) over ``actors``, ready to submit."""
    if kind == "compiled_graph":
        return CompiledGraphTransport(actors, max_in_flight, device, method)
    return ObjectStoreTransport(actors, method)
