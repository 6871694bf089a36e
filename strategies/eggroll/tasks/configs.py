"""Task configs: `strategy.task` in a run config, one kind per task."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class GymTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["gym"] = "gym"
    env: str = Field(default="CartPole-v1", description="A gymnasium environment id.")
    hidden: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [16], description="Hidden widths of the tanh MLP policy."
    )
    episodes_per_member: int = Field(default=1, gt=0, description="Fitness = their mean return.")
    max_episode_steps: int | None = Field(
        default=None, gt=0, description="Episode length cap; None keeps the env's own."
    )
    eval_episodes: int = Field(default=20, gt=0)


class ClassificationTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["classification"] = "classification"
    batch_size: int = Field(default=256, gt=0, description="Train rows every member is scored on.")
    eval_batches: int | None = Field(
        default=None, gt=0, description="Cap on held-out batches; None evaluates all."
    )


class CharLMTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["char_lm"] = "char_lm"
    corpus: str | None = Field(
        default=None, description="A UTF-8 text file; None generates a corpus from a grammar."
    )
    corpus_chars: int = Field(
        default=200_000, gt=0, description="Characters used (generated, or the file's first)."
    )
    embed: int = Field(default=32, gt=0)
    hidden: int = Field(default=128, gt=0, description="GRU state width.")
    seq_len: int = Field(default=64, gt=0, description="Characters predicted per sequence.")
    batch_size: int = Field(default=16, gt=0, description="Sequences every member is scored on.")
    int8: bool = Field(default=False, description="Run the GRU gates on int8 weights.")
    eval_sequences: int = Field(default=64, gt=0)


TaskConfig = Annotated[
    GymTaskConfig | ClassificationTaskConfig | CharLMTaskConfig, Field(discriminator="kind")
]
