"""The training loss of every task, scored the same way by a pipeline block, the backprop
worker and the plain-PyTorch baselines."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from orchestrator.data.spec import InputSpec


class TaskLoss(NamedTuple):
    loss: torch.Tensor
    hits: torch.Tensor
    """Correct top-1 predictions (a 0-d tensor: read it when the caller syncs anyway)."""
    count: int
    """Predictions scored: examples, or tokens for language modelling."""


def task_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> TaskLoss:
    """Cross-entropy of class scores [B, C] against classes [B], or of next-token scores
    [B, T, V] against the next tokens [B, T] (every position one prediction)."""
    scores = logits.reshape(-1, logits.shape[-1])
    wanted = targets.reshape(-1)
    loss = F.cross_entropy(scores, wanted, reduction=reduction)
    hits = (scores.detach().argmax(dim=1) == wanted).sum()
    return TaskLoss(loss, hits, wanted.numel())


def with_bits(metrics: dict[str, float], spec: InputSpec, scope: str) -> dict[str, float]:
    """``metrics`` plus ``<scope>/bits_per_token`` for a language model: its loss (nats per
    token) in bits, the figure language-model papers report (bits per character with the
    byte tokenizer on ASCII text)."""
    if spec.is_sequence and f"{scope}/loss" in metrics:
        return {**metrics, f"{scope}/bits_per_token": metrics[f"{scope}/loss"] / math.log(2)}
    return metrics
