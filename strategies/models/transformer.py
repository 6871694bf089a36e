"""A decoder-only causal transformer, GPT-2's layout with pre-norm (as nanoGPT's
``model.py``): token + learned position embedding, blocks of causal self-attention and a
GELU MLP each behind a LayerNorm on the residual stream, a final LayerNorm and a linear
map to the vocabulary. Weights are drawn as nanoGPT draws them: N(0, 0.02), the
projections into the residual stream scaled by 1/sqrt(2 * layers) (GPT-2 §2.3).

The units are the transformer blocks; the embedding belongs to the first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import TransformerConfig
from strategies.models.units import Shape


class Embedding(nn.Module):
    """Token ids [B, T] to the residual stream [B, T, d]."""

    def __init__(self, vocab: int, context: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(context, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Positions indexed like the ids, so leading dims beyond the batch (EGGROLL's
        # population members, each with its own perturbed table) carry through.
        positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        return self.dropout(self.tokens(ids) + self.positions(positions))


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.heads, self.dropout = heads, dropout
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, time, width = x.shape  # lead: the batch, or EGGROLL's [members, batch]
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(-3, -2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(-3, -2).reshape(*lead, time, width)
        return self.residual_dropout(self.out(y))


class TransformerBlock(nn.Module):
    """x + attn(LN(x)), then + MLP(LN(x)): pre-norm keeps the residual stream's scale
    free of the blocks, so a block trains the same wherever a pipeline cuts."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def next_token_head(d_model: int, vocab: int) -> nn.Sequential:
    """Final LayerNorm and the map to vocabulary scores: the output layer, and the local
    head of a block in a pipeline."""
    return nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, vocab))


def _block(model: TransformerConfig) -> TransformerBlock:
    block = TransformerBlock(model.d_model, model.heads, model.mlp_ratio, model.dropout)
    return initialise(block, model.layers)


def initialise(module: nn.Module, layers: int) -> nn.Module:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, CausalSelfAttention):
            nn.init.normal_(m.out.weight, std=0.02 / math.sqrt(2 * layers))
        elif isinstance(m, TransformerBlock):
            nn.init.normal_(m.mlp[2].weight, std=0.02 / math.sqrt(2 * layers))
    return module


def build(model: TransformerConfig, spec: InputSpec) -> list[nn.Module]:
    """The blocks (the embedding inside the first), then the next-token head.

    ``tie_embeddings``: the head's projection *is* the token embedding matrix (one
    parameter, Press & Wolf 2017), which only works where both sit in one module tree:
    the whole network (backprop) or a one-block pipeline. Cut into blocks, the embedding
    lives on the first block's worker and the head on the last's, so there is nothing to
    share; the pipeline's config check refuses that combination.
    """
    vocab, context = spec.num_classes, spec.shape[0]
    embedding = initialise(Embedding(vocab, context, model.d_model, model.dropout), model.layers)
    units: list[nn.Module] = [_block(model) for _ in range(model.layers)]
    units[0] = nn.Sequential(embedding, units[0])
    head = initialise(next_token_head(model.d_model, vocab), model.layers)
    if model.tie_embeddings:
        head[1].weight = embedding.tokens.weight
    return [*units, head]


def rebuild_units(
    model: TransformerConfig,
    spec: InputSpec,
    chosen: Sequence[int],
    shape: Shape,
    shapes: Sequence[Shape],
) -> list[nn.Module]:
    """A fresh transformer block per chosen block: every block maps [T, d] to [T, d]."""
    if shape != (spec.shape[0], model.d_model):
        raise ConfigError(
            f"a transformer aux net takes [context, d_model] = "
            f"{(spec.shape[0], model.d_model)} activations, got {shape}"
        )
    return [_block(model) for _ in chosen]
