"""What one example of a data set looks like to a network: the contract between the data
readers (``orchestrator.data``) and the model families (``strategies.models``).

Plain data, no torch: a config is validated and a network's units are planned from this
alone, and it travels to every worker inside ``DatasetInfo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

InputKind = Literal["table", "image", "tokens"]

MAX_CLASSES = 2**20
"""A classifier's output layer has a row per class; past a million classes a label column
is a row id or a hash, not class ids (a label of 10**12 failed inside a worker)."""


@dataclass(frozen=True)
class InputSpec:
    """One example's shape, and what the network predicts from it.

    * ``table``: ``shape == (features,)``, float features; the target is a class.
    * ``image``: ``shape == (channels, height, width)``, normalised float pixels; the
      target is a class.
    * ``tokens``: ``shape == (context,)``, integer token ids; the target is the next
      token at every position (``num_classes`` is the vocabulary size).
    """

    kind: InputKind
    shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        dims = {"table": 1, "image": 3, "tokens": 1}[self.kind]
        if len(self.shape) != dims or min(self.shape) <= 0:
            raise ValueError(f"a {self.kind} example has {dims} positive dims, got {self.shape}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")

    @property
    def is_sequence(self) -> bool:
        """Whether the target is a token per position (language modelling)."""
        return self.kind == "tokens"
