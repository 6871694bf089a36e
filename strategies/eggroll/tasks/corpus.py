"""EGGROLL's character-level view of a text: its own vocabulary and a 90/10 position split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class CharCorpus:
    """A text as character ids, split 90/10 by position into train and held-out."""

    vocab: str
    train: torch.Tensor
    held_out: torch.Tensor

    @classmethod
    def from_text(cls, text: str) -> CharCorpus:
        vocab = "".join(sorted(set(text)))
        lookup = {char: index for index, char in enumerate(vocab)}
        ids = torch.tensor([lookup[char] for char in text], dtype=torch.long)
        cut = int(len(ids) * 0.9)
        return cls(vocab, ids[:cut], ids[cut:])


def read_corpus(path: str, chars: int) -> str:
    try:
        with open(Path(path).expanduser(), encoding="utf-8") as handle:
            return handle.read(chars)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"strategy.task.corpus: {path!r} is not a readable UTF-8 text file ({err}); give "
            "one, or remove strategy.task.corpus to use the generated corpus"
        ) from None
