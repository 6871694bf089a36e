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
* ``projection_head``: Mono-Forward's (Gong et al., arXiv:2501.09238) learned projection
  of a layer's activations to the classes, ``G = a M^T`` with no bias.
* ``MomentumAuxHead``: MAN (Su et al., ECCV 2024): before the head, an exponential moving
  average of the *next* block's first unit plus a learnable unit of the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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


def projection_head(shape: Shape, spec: InputSpec) -> nn.Sequential:
    """Mono-Forward's projection ``M`` of a block's output to the classes: a bias-free
    linear map of features [F]; of a feature map [C, H, W] after global average pooling
    (the paper's conv layers project their flattened maps; pooling keeps ``M`` small)."""
    if spec.is_sequence or len(shape) not in (1, 3):
        raise ConfigError(
            f"strategy.local_rule: mono_forward projects [F] features or [C, H, W] maps to "
            f"classes, but a block gives {shape}"
            + (" for next-token prediction" if spec.is_sequence else "")
            + "; use local_rule: cross_entropy"
        )
    pooled: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if len(shape) == 3 else []
    return nn.Sequential(*pooled, nn.Linear(shape[0], spec.num_classes, bias=False))


class MomentumAuxHead(nn.Module):
    """MAN's head: ``readout(learnable(h) + ema(h))``, where ``ema`` follows the next
    block's first unit by an exponential moving average (``ema_update_``) and
    ``learnable`` is a unit of the same shape trained with the head.

    The EMA copy passes the next block's features back to the local loss without a
    gradient from above; the learnable unit (the paper's "learnable biases"; its code
    trains a full copy of the layer, as here) adapts them to this block. Both start from
    their own random initialisation, as in the reference code, whose init loop runs after
    the copies are made.
    """

    def __init__(self, ema: nn.Module, learnable: nn.Module, readout: nn.Module) -> None:
        super().__init__()
        self.ema = ema.requires_grad_(False)
        self.learnable = learnable
        self.readout = readout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.readout(self.learnable(hidden) + self.ema(hidden))


@torch.no_grad()
def ema_update_(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], momentum: float
) -> None:
    """``target <- momentum * target + (1 - momentum) * source``, parameter by parameter
    (MAN averages parameters only; batch-norm statistics stay the copy's own)."""
    if target.keys() != source.keys():
        raise ValueError(
            f"EMA source parameters {sorted(source)} do not match the copy's {sorted(target)}"
        )
    for name, value in target.items():
        value.lerp_(source[name].to(value.device, value.dtype), 1.0 - momentum)


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
