"""Hugging Face Accelerate: device placement, mixed precision and gradient accumulation,
its ``Accelerator`` owning the backward and the optimizer step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from strategies.engines.base import Engine, keeping_threads

if TYPE_CHECKING:
    from orchestrator.config import EngineConfig

_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class AccelerateEngine(Engine):
    def __init__(
        self,
        modules: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
        config: EngineConfig,
        device: str,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(modules, optimizer, config, device, skip_nonfinite)
        # Accelerate keeps its settings in process-wide singletons that refuse a second
        # precision. A worker process holds one engine; a process that builds several in
        # turn (tests, the benchmark) starts each from a clean state.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        with keeping_threads():
            self.accelerator = Accelerator(
                cpu=self.device.type == "cpu",
                mixed_precision=_MIXED[config.precision],
                gradient_accumulation_steps=config.grad_accumulation,
            )
        # prepare() returns the same modules (autocast patched into their forward, on the
        # device) and wraps the optimizer so it steps only where a window closes.
        *prepared, self.wrapped = self.accelerator.prepare(*self.modules, optimizer)
        self.modules = prepared

    def update(self, loss: torch.Tensor, measure_norm: bool = False) -> bool:
        with self.accelerator.accumulate(*self.modules):
            if self._admits(loss):
                self.accelerator.backward(loss)  # divides by grad_accumulation
            closes = self.accelerator.sync_gradients
            # fp16's scaler already drops a step whose gradient overflowed (and lowers its
            # scale): that is routine loss scaling, left to it, not a skipped update.
            checks = self.skip_nonfinite and self.accelerator.scaler is None
            norm = math.nan
            if closes and (measure_norm or checks) and not self.poisoned:
                norm = float(self.accelerator.clip_grad_norm_(self.parameters(), math.inf))
            if measure_norm and closes:  # fp16: unscaled first
                self.grad_norm = norm
            if not (closes and self._skips(norm if checks else 0.0)):
                self.wrapped.step()  # a no-op until the window closes
            self.wrapped.zero_grad(set_to_none=True)
        return self._advance(closes)

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"optimizer": self.wrapped.state_dict()}
        if self.accelerator.scaler is not None:  # fp16's loss scale travels with the run
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load(self, state: dict[str, Any]) -> None:
        self.wrapped.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
