"""The fitness functions EGGROLL optimises: a gym policy, a classifier, a character-level LM.

Pure torch and gymnasium, no Ray. Every task keeps one rule that sharding a population
across workers depends on: member j's fitness is a function of (generation, seed, j's
perturbation) alone, never of which other members share the call. So all members of a
generation meet the same environment seeds or the same batch (common random numbers):
workers scoring different shards use one yardstick, and fitness differences between
members measure their perturbations rather than their luck.

Inside ``population(model, noise)`` the models take inputs with a leading member dim k;
a shared input is ``expand``-ed to it (no copy), and one model call serves all k members.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from orchestrator.data.source import DatasetInfo
from orchestrator.errors import ConfigError
from strategies.es_tasks.char_lm import CharLMTask
from strategies.es_tasks.classification import ClassificationTask
from strategies.es_tasks.configs import (
    CharLMTaskConfig,
    ClassificationTaskConfig,
    GymTaskConfig,
    TaskConfig,
)
from strategies.es_tasks.corpus import generated_corpus
from strategies.es_tasks.gym import GymTask, episode_seed
from strategies.network import ModelConfig


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
    """The task a config describes; classification uses the run's model and data sections."""
    if isinstance(config, GymTaskConfig):
        return GymTask(config)
    if isinstance(config, CharLMTaskConfig):
        return CharLMTask(config)
    if dataset is None:
        raise ConfigError(
            "strategy.task.kind: classification needs a data section (data.dataset or "
            "data.path); add one, or choose kind gym or char_lm"
        )
    return ClassificationTask(config, model or ModelConfig(), dataset)


__all__ = [
    "CharLMTask",
    "CharLMTaskConfig",
    "ClassificationTask",
    "ClassificationTaskConfig",
    "ESTask",
    "GymTask",
    "GymTaskConfig",
    "TaskConfig",
    "build_task",
    "episode_seed",
    "generated_corpus",
]
