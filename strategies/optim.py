"""Optimizers from the config: one place so every strategy builds them the same way."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from strategies.config import OptimizerConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], config: OptimizerConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    rate = config.lr if lr is None else lr
    if config.kind == "sgd":
        return torch.optim.SGD(
            params, lr=rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    cls = torch.optim.AdamW if config.kind == "adamw" else torch.optim.Adam
    return cls(params, lr=rate, weight_decay=config.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
