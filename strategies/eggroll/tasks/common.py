"""Helpers every task shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Layers created inside draw their init from ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def member_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per member: logits [k, ..., C], targets [...] shared by all -> [k]."""
    log_probs = logits.log_softmax(-1)
    index = targets.expand(log_probs.shape[:-1]).unsqueeze(-1)
    return -log_probs.gather(-1, index).squeeze(-1).flatten(1).mean(1)
