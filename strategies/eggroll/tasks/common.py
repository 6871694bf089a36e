"""Helpers every task shares."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def member_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per member: logits [k, ..., C], targets [...] shared by all -> [k]."""
    log_probs = logits.log_softmax(-1)
    index = targets.expand(log_probs.shape[:-1]).unsqueeze(-1)
    return -log_probs.gather(-1, index).squeeze(-1).flatten(1).mean(1)
