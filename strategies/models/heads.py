"""Local heads: what turns a block's output into a prediction, so the block can learn from
its own loss. Driven by the output's shape and the task, not by the family, so a custom
network gets them too.

* ``linear_head``: the smallest readout of each shape: a linear map for features [F],
  global average pooling + linear for feature maps [C, H, W] (AugLocal's ``0c1f``
  baseline), final LayerNorm + linear to the vocabulary for a token stream [T, d] (the
  network's own output layer, untied).
* ``auxiliary_net``: AugLocal (Ma et al., ICLR 2024, §3.2): fresh copies of a uniformly
  chosen subset of the units after the block, each rebuilt by its family to take the
  shape before it, then the linear head. From the reference code (ChenxiangMA/AugLocal,
  ``networks/auxiliary_nets.py``, ``AuxNetwork`` with ``net_config='unifSamp'``) we keep
  which layers are copied, their widths (the copied layers' own), the stride-2 blocks
  that catch up with the downsampling the copied layers did, the closing global average
  pooling + linear classifier, and batch norm on the pooled features for a conv aux net
  of depth 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig
from strategies.models.network import FAMILIES
from strategies.models.transformer import next_token_head
from strategies.models.units import Shape, activation_batch, run_modules


def linear_head(shape: Shape, spec: InputSpec, normalise: bool = False) -> nn.Sequential:
    """The readout of one example of ``shape`` for the task ``spec`` describes;
    ``normalise``: batch norm on pooled conv features (AugLocal's depth-1 aux nets)."""
    if len(shape) == 1 and not spec.is_sequence:
        return nn.Sequential(nn.Linear(shape[0], spec.num_classes))
    if len(shape) == 3 and not spec.is_sequence:
        pooled: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if normalise:
            pooled.append(nn.BatchNorm1d(shape[0]))
        return nn.Sequential(*pooled, nn.Linear(shape[0], spec.num_classes))
    if len(shape) == 2 and spec.is_sequence and shape[0] == spec.shape[0]:
        return next_token_head(shape[1], spec.num_classes)
    task = "next-token prediction over [T, d]" if spec.is_sequence else "classification"
    raise ConfigError(
        f"no local head reads a block output of shape {shape} for {task}: heads read [F] "
        "features or [C, H, W] maps (classification) or [T, d] streams (tokens); make each "
        "unit of a custom model give one of those"
    )


def auxiliary_net(
    model: ModelConfig,
    spec: InputSpec,
    chosen: Sequence[int],
    shape: Shape,
    shapes: Sequence[Shape],
) -> nn.Sequential:
    """AugLocal's head of a block whose output has ``shape``: fresh units like ``chosen``
    (of the network's units, whose outputs are ``shapes``), then the linear head."""
    units = FAMILIES[model.kind].rebuild_units(model, spec, chosen, shape, shapes)
    what = [f"aux-net copy of unit {j} ({type(m).__name__})" for j, m in zip(chosen, units)]
    final = run_modules(units, activation_batch(shape), what)[-1].out_shape
    head = linear_head(final, spec, normalise=len(chosen) == 1 and len(final) == 3)
    return nn.Sequential(*units, *head)
