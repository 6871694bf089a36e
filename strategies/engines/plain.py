"""The plain torch engine: ``loss.backward()`` and ``optimizer.step()``."""

from __future__ import annotations

import math
from typing import Any

import torch

from strategies.engines.base import Engine


class TorchEngine(Engine):
    def update(self, loss: torch.Tensor, measure_norm: bool = False) -> bool:
        window = self.config.grad_accumulation
        if self.pending == 0:  # a window opens; the last step's gradients stay readable till now
            self.optimizer.zero_grad(set_to_none=True)
        if self._admits(loss):
            (loss / window).backward()  # the step follows the window's mean gradient
        if self.pending + 1 < window:
            return self._advance(False)
        checked = (measure_norm or self.skip_nonfinite) and not self.poisoned
        norm = self._gradient_norm() if checked else math.nan
        if measure_norm:
            self.grad_norm = norm
        if self._skips(norm):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        return self._advance(True)

    def _state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()  # as saved before engines: old checkpoints load

    def load(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
