"""Task configs: `strategy.task` in a run config, one kind per task."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class GymTaskConfig(BaseModel):
    """Reinforcement learning in a gymnasium environment: fitness is the episode return."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["gym"] = Field(default="gym", description="This task.")
    env: str = Field(default="CartPole-v1", description="A gymnasium environment id.")
    hidden: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [16], description="Hidden widths of the tanh MLP policy."
    )
    episodes_per_member: int = Field(default=1, gt=0, description="Fitness = their mean return.")
    max_episode_steps: int | None = Field(
        default=None, gt=0, description="Episode length cap; None keeps the env's own."
    )
    eval_episodes: int = Field(default=20, gt=0, description="Episodes of each evaluation.")


class ClassificationTaskConfig(BaseModel):
    """Classification of the run's data by its model section, with no gradients: fitness
    is minus a batch's loss."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["classification"] = Field(default="classification", description="This task.")
    batch_size: int = Field(default=256, gt=0, description="Train rows every member is scored on.")
    eval_batches: int | None = Field(
        default=None, gt=0, description="Cap on held-out batches; None evaluates all."
    )


class LanguageModelTaskConfig(BaseModel):
    """Next-token prediction on the run's token data by its model section (a transformer,
    or your own network), with no gradients: fitness is minus a batch's loss per token."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["lm"] = Field(default="lm", description="This task.")
    batch_size: int = Field(
        default=32, gt=0, description="Token windows every member is scored on."
    )
    eval_batches: int | None = Field(
        default=None, gt=0, description="Cap on held-out batches; None evaluates all."
    )


class CharLMTaskConfig(BaseModel):
    """A character-level GRU language model: fitness is minus its loss per character."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["char_lm"] = Field(default="char_lm", description="This task.")
    corpus: str | None = Field(
        default=None, description="A UTF-8 text file; None generates a corpus from a grammar."
    )
    corpus_chars: int = Field(
        default=200_000, gt=0, description="Characters used (generated, or the file's first)."
    )
    embed: int = Field(default=32, gt=0, description="Character embedding width.")
    hidden: int = Field(default=128, gt=0, description="GRU state width.")
    seq_len: int = Field(default=64, gt=0, description="Characters predicted per sequence.")
    batch_size: int = Field(default=16, gt=0, description="Sequences every member is scored on.")
    int8: bool = Field(default=False, description="Run the GRU gates on int8 weights.")
    eval_sequences: int = Field(
        default=64, gt=0, description="Held-out sequences of each evaluation."
    )


DataTaskConfig = ClassificationTaskConfig | LanguageModelTaskConfig
"""The tasks that train the run's model on the run's data."""

TaskConfig = Annotated[
    GymTaskConfig | ClassificationTaskConfig | LanguageModelTaskConfig | CharLMTaskConfig,
    Field(discriminator="kind"),
]
