"""The engine interface and its factory."""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from orchestrator.errors import ConfigError
from strategies.engines.offload import ActivationOffload

if TYPE_CHECKING:
    from orchestrator.config import EngineConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(ABC):
    """Owns the optimizer step of some modules: ``with engine.autocast(): loss = ...``,
    then ``engine.update(loss)``.

    ``update`` backpropagates ``loss / grad_accumulation`` and steps the optimizer once
    every ``grad_accumulation`` calls, so a step follows the mean gradient of its batches.
    ``optimizer`` is the torch optimizer the engine was given: its ``param_groups`` are
    the live ones, so a learning-rate change applies however the engine wraps it.

    With ``skip_nonfinite`` (``run.nonfinite: skip``) a batch whose loss is not finite is
    not backpropagated, and a window holding one, or whose gradient is not finite, ends
    with its gradients zeroed and no optimizer step; ``skipped`` counts such windows and
    ``applied`` says whether the last batch's update was taken (a batch earlier in a
    window skipped later counts as applied: with ``grad_accumulation: 1``, the default, it
    is exact). The check is one ``isfinite`` on the loss and one fused norm over the
    gradients where a window closes; without ``skip_nonfinite`` none of it runs.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
        config: EngineConfig,
        device: str,
        skip_nonfinite: bool = False,
    ) -> None:
        self.modules = list(modules)
        self.device = torch.device(device)
        self.optimizer = optimizer
        self.config = config
        self.pending = 0  # batches backpropagated since the last optimizer step
        self.grad_norm = math.nan
        """The norm of the (mean) gradient the last step followed, when measured."""
        self.skip_nonfinite = skip_nonfinite
        self.skipped = 0
        """Optimizer steps skipped because their loss or gradient was not finite."""
        self.applied = True
        """Whether the last batch's update was taken (always, without ``skip_nonfinite``)."""
        self.poisoned = False  # a batch of the open window had a non-finite loss
        self.offload = build_offload(config, self.device)
        """Where the forward's saved activations go (``engine.offload_activations``)."""

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward's context, whatever the engine: its precision (``_precision``) and,
        with ``engine.offload_activations``, the offloading of what autograd saves."""
        saving = self.offload.saving() if self.offload is not None else contextlib.nullcontext()
        with saving, self._precision():
            yield

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """The forward's precision: fp32 as is, else torch autocast to bf16/fp16."""
        if self.config.precision == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=_DTYPES[self.config.precision]):
            yield

    @abstractmethod
    def update(self, loss: torch.Tensor, measure_norm: bool = False) -> bool:
        """Backpropagate ``loss``; step when the accumulation window closes (True then),
        with ``measure_norm`` recording the gradient's norm in ``grad_norm`` first."""

    def parameters(self) -> list[torch.Tensor]:
        """What the optimizer updates."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _admits(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` may be backpropagated: always, unless skipping non-finite
        updates and it is NaN or infinite (then its window is marked to be skipped)."""
        if self.pending == 0:
            self.poisoned = False
        if self.skip_nonfinite and not bool(torch.isfinite(loss.detach()).all()):
            self.poisoned = True
            self.applied = False
            return False
        self.applied = True
        return True

    def _gradient_norm(self) -> float:
        """The total norm of the gradients the optimizer holds: one fused pass."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False, foreach=True))

    def _skips(self, norm: float) -> bool:
        """Where a window closes: whether its step is dropped (counted in ``skipped``)."""
        if not self.skip_nonfinite or not (self.poisoned or not math.isfinite(norm)):
            return False
        self.skipped += 1
        self.applied = False
        return True

    def _advance(self, stepped: bool) -> bool:
        """Count a batch into the window; a step closes it."""
        self.pending = 0 if stepped else self.pending + 1
        return stepped

    def state(self) -> dict[str, Any]:
        """The optimizer side of the engine in tensors and plain data (a checkpoint is read
        with ``torch.load(weights_only=True)``); the modules' weights are the owner's."""
        if self.pending:
            raise RuntimeError(
                f"engine state asked for {self.pending} batches into an accumulation window "
                f"of {self.config.grad_accumulation}; checkpoints fall between steps"
            )
        return self._state()

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def load(self, state: dict[str, Any]) -> None:
        """Restore ``state()``; call it after the modules' weights are loaded."""

    def close(self) -> None:
        """Remove the offload's files and stop its threads (garbage collection does too)."""
        if self.offload is not None:
            self.offload.close()


def build_offload(config: EngineConfig, device: torch.device) -> ActivationOffload | None:
    """The activation offload ``config`` asks for on ``device``, or None."""
    where = config.offload_activations
    if where == "none":
        return None
    if where == "host" and device.type != "cuda":
        raise ConfigError(
            f"engine.offload_activations: 'host' on a worker whose device is {str(device)!r} "
            "saves nothing (its activations are in host memory already); use 'disk', or "
            "give the workers a GPU (resources.gpus_per_worker)"
        )
    try:
        return ActivationOffload(where, device, config.min_offload_bytes, config.offload_dir)
    except OSError as error:
        raise ConfigError(
            f"engine.offload_dir: {config.offload_dir!r} cannot hold the offloaded "
            f"activations on this worker ({error}); give a writable directory that exists "
            "on every node, or leave it unset for the system's temporary directory"
        ) from error


@contextlib.contextmanager
def keeping_threads() -> Iterator[None]:
    """Keep the worker's torch thread count (its share of the node) through a library's
    setup: Accelerate and DeepSpeed set their own when they see a process group."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_engine(
    config: EngineConfig,
    modules: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    device: str,
    skip_nonfinite: bool = False,
) -> Engine:
    """The engine ``config.kind`` names over ``modules`` (already on ``device``), whose
    parameters ``optimizer`` holds; extra parameters (a learned head) may be in it too.
    ``skip_nonfinite``: drop updates whose loss or gradient is not finite (``Engine``)."""
    if config.kind == "accelerate":
        from strategies.engines.accelerate_engine import AccelerateEngine

        return AccelerateEngine(modules, optimizer, config, device, skip_nonfinite)
    if config.kind == "deepspeed":
        from strategies.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(modules, optimizer, config, device, skip_nonfinite)
    from strategies.engines.plain import TorchEngine

    return TorchEngine(modules, optimizer, config, device, skip_nonfinite)
