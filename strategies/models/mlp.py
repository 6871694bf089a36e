"""The multilayer perceptron on tabular features: its units are the hidden layers.

Kept small (nanoGPT-style) so the pipeline and the backprop baseline build exactly the same
layers from the same seed, which is what makes them comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from orchestrator.data.spec import InputSpec
from strategies.config import MLPConfig
from strategies.models.units import Shape

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def hidden_layer(in_dim: int, out_dim: int, model: MLPConfig) -> nn.Sequential:
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


def layer_widths(model: MLPConfig, num_features: int) -> list[int]:
    """Input width followed by every hidden width: layer i maps widths[i] -> widths[i+1]."""
    return [num_features, *model.hidden]


def build(model: MLPConfig, spec: InputSpec) -> list[nn.Module]:
    """Hidden layers, then the output layer."""
    widths = layer_widths(model, spec.shape[0])
    layers: list[nn.Module] = [
        hidden_layer(widths[i], widths[i + 1], model) for i in range(len(model.hidden))
    ]
    layers.append(nn.Linear(widths[-1], spec.num_classes))
    return layers


def rebuild_units(
    model: MLPConfig, spec: InputSpec, chosen: Sequence[int], shape: Shape, shapes: Sequence[Shape]
) -> list[nn.Module]:
    """Fresh hidden layers of the chosen layers' widths, each taking the width before it."""
    units: list[nn.Module] = []
    width = shape[0]
    for unit in chosen:
        units.append(hidden_layer(width, shapes[unit][0], model))
        width = shapes[unit][0]
    return units
