"""The network every strategy trains: an MLP described by ``model`` in the config.

Kept in one small file (nanoGPT-style) so the pipeline and the backprop baseline build
exactly the same layers from the same seed, which is what makes them comparable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from strategies.config import ModelConfig


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def hidden_layer(in_dim: int, out_dim: int, model: ModelConfig) -> nn.Sequential:
    """One hidden layer: linear, normalisation, activation, dropout."""
    parts: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    if model.norm == "layernorm":
        parts.append(nn.LayerNorm(out_dim))
    elif model.norm == "batchnorm":
        parts.append(nn.BatchNorm1d(out_dim))
    parts.append(_ACTIVATIONS[model.activation]())
    if model.dropout > 0:
        parts.append(nn.Dropout(model.dropout))
    return nn.Sequential(*parts)


def layer_widths(model: ModelConfig, num_features: int) -> list[int]:
    """Input width followed by every hidden width: layer i maps widths[i] -> widths[i+1]."""
    return [num_features, *model.hidden]


def build_network(
    model: ModelConfig, num_features: int, num_classes: int, seed: int
) -> nn.Sequential:
    """Hidden layers then the output layer, initialised from ``seed`` alone."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        widths = layer_widths(model, num_features)
        layers = [hidden_layer(widths[i], widths[i + 1], model) for i in range(len(model.hidden))]
        layers.append(nn.Linear(widths[-1], num_classes))
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(generator_state)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
