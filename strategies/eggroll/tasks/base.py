"""The task protocol a population worker calls, and the one function that builds a task
from its config section."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from orchestrator.data.source import DatasetInfo
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig
from strategies.eggroll.tasks.char_lm import CharLMTask
from strategies.eggroll.tasks.configs import CharLMTaskConfig, GymTaskConfig, TaskConfig
from strategies.eggroll.tasks.gym import GymTask
from strategies.eggroll.tasks.supervised import SupervisedTask


class ESTask(Protocol):
    """What a population worker needs from a task."""

    def build_model(self, seed: int) -> nn.Module:
        """ES layers only, initialised from ``seed`` alone (every replica builds the same)."""
        ...

    def fitness(self, model: nn.Module, k: int, generation: int, seed: int) -> torch.Tensor:
        """Inside ``population``: float32 [k], higher is better, one per member."""
        ...

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        """The unperturbed model on held-out episodes or data; keys start with ``eval/``."""
        ...


def build_task(
    config: TaskConfig, model: ModelConfig | None, dataset: DatasetInfo | None
) -> ESTask:
    """The task a config describes; classification and lm use the run's model and data
    sections."""
    if isinstance(config, GymTaskConfig):
        return GymTask(config)
    if isinstance(config, CharLMTaskConfig):
        return CharLMTask(config)
    if dataset is None:
        raise ConfigError(
            f"strategy.task.kind: {config.kind} needs a data section (data.dataset or "
            "data.path); add one, or choose kind gym or char_lm"
        )
    return SupervisedTask(config, model or ModelConfig(), dataset)
