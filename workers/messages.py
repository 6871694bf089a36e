"""What one block hands the next through the Ray object store.

Per-block statistics ride along with the activation so the driver learns every block's
numbers from the last block's small reply, without a call per block and without the
activations ever passing through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BlockRecord:
    block: int
    loss: float
    correct: int
    count: int
    start: float
    end: float


@dataclass
class Activation:
    hidden: torch.Tensor | None
    labels: torch.Tensor | None
    records: list[BlockRecord] = field(default_factory=list)
