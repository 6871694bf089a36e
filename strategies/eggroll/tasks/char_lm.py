"""A character-level GRU language model built from ES layers (optionally int8)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from orchestrator.data.corpus import generated_corpus
from orchestrator.errors import ConfigError
from strategies.eggroll.lowrank import ESEmbedding, ESInt8Linear, ESLinear
from strategies.eggroll.tasks.common import member_nll, model_device
from strategies.eggroll.tasks.configs import CharLMTaskConfig
from strategies.eggroll.tasks.corpus import CharCorpus, read_corpus
from strategies.models.network import seeded


class CharGRU(nn.Module):
    """Embedding, a GRU cell whose gates are ES layers, and a linear head over characters.

    Tokens [..., T] -> next-character logits [..., T, vocab]. The input gates of all T
    steps are one call; only the hidden-state gates run step by step.
    """

    def __init__(self, vocab: int, embed: int, hidden: int, int8: bool) -> None:
        super().__init__()
        gate = ESInt8Linear if int8 else ESLinear
        self.hidden = hidden
        self.embed = ESEmbedding(vocab, embed)
        self.input_gates = gate(embed, 3 * hidden)
        self.hidden_gates = gate(hidden, 3 * hidden)
        self.head = ESLinear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from_input = self.input_gates(self.embed(tokens))
        state = from_input.new_zeros(*tokens.shape[:-1], self.hidden)
        states = []
        for step in range(tokens.shape[-1]):
            state = self._step(from_input[..., step, :], state)
            states.append(state)
        return self.head(torch.stack(states, dim=-2))

    def _step(self, from_input: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One GRU step; both sigmoid gates in one call, as elementwise launches dominate."""
        split = [2 * self.hidden, self.hidden]
        x_gates, x_new = from_input.split(split, dim=-1)
        h_gates, h_new = self.hidden_gates(state).split(split, dim=-1)
        reset, update = torch.sigmoid(x_gates + h_gates).chunk(2, dim=-1)
        candidate = torch.tanh(x_new + reset * h_new)
        return candidate + update * (state - candidate)


_LM_SALT = 0xC4A2


def _windows(ids: torch.Tensor, starts: np.ndarray, length: int) -> torch.Tensor:
    """Sequences [len(starts), length] cut from ``ids`` at ``starts``."""
    return ids[torch.from_numpy(starts).view(-1, 1) + torch.arange(length)]


class CharLMTask:
    """Next-character prediction; fitness is minus the mean cross-entropy in nats/char."""

    def __init__(self, config: CharLMTaskConfig) -> None:
        self.config = config
        if config.corpus is None:
            text = generated_corpus(config.corpus_chars)
        else:
            text = read_corpus(config.corpus, config.corpus_chars)
        self.corpus = CharCorpus.from_text(text)
        if len(self.corpus.held_out) <= config.seq_len:
            raise ConfigError(
                f"strategy.task.corpus_chars: {len(text)} characters leave a held-out tenth "
                f"too short for one sequence of strategy.task.seq_len {config.seq_len}; use "
                f"at least {10 * (config.seq_len + 2)} characters or a shorter seq_len"
            )

    def build_model(self, seed: int) -> nn.Module:
        with seeded(seed):
            return CharGRU(
                len(self.corpus.vocab), self.config.embed, self.config.hidden, self.config.int8
            )

    def _pairs(self, sequences: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, ...]:
        """Inputs and targets on the model's device: each character predicts the next."""
        device = model_device(model)
        return sequences[:, :-1].to(device), sequences[:, 1:].to(device)

    @torch.no_grad()
    def fitness(self, model: nn.Module, k: int, generation: int, seed: int) -> torch.Tensor:
        length = self.config.seq_len + 1
        rng = np.random.default_rng([_LM_SALT, seed, generation])
        starts = rng.integers(0, len(self.corpus.train) - length + 1, size=self.config.batch_size)
        inputs, targets = self._pairs(_windows(self.corpus.train, starts, length), model)
        logits = model(inputs.expand(k, *inputs.shape))
        return -member_nll(logits, targets).float().cpu()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        """The same evenly spaced held-out sequences every time, whatever the seed."""
        length = self.config.seq_len + 1
        last = len(self.corpus.held_out) - length
        starts = np.linspace(0, last, self.config.eval_sequences).round().astype(np.int64)
        inputs, targets = self._pairs(_windows(self.corpus.held_out, starts, length), model)
        loss = member_nll(model(inputs).unsqueeze(0), targets).item()
        return {"eval/bits_per_char": loss / math.log(2), "eval/loss": loss}
