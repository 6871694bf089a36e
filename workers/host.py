"""State leaves a worker on the host: whatever device the worker trains on, what it hands
the controller (checkpoints, resyncs, exports) must load on a driver with no GPU."""

from __future__ import annotations

from typing import Any

import torch


def on_host(value: Any) -> Any:
    """``value`` with every tensor in it on the CPU (through nested dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: on_host(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(on_host(v) for v in value)
    return value
