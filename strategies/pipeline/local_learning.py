"""Local learning: cut a network into blocks, give each a head and a loss of its own.

Block k computes ``h_k = body_k(h_{k-1}.detach())`` and updates on
``loss(head_k(h_k), y)`` at once, so no block waits for a backward pass from above
(the update locking that local learning removes). The blocks are runs of the network's
units (``strategies.models``), any family. Two kinds of head
(``strategies.models.heads``):

* ``linear``: the smallest readout of the block's output (DGL/greedy layer-wise style);
* ``augmented``: AugLocal (Ma et al., ICLR 2024): the head is a fresh copy of a
  *uniformly chosen subset* of the units after the block, then the linear readout, so
  the local objective sees the kind of computation that follows; its depth falls
  linearly from ``aux_depth`` for the first block to 1 for the last local block.

No Ray here: workers wrap ``LocalBlock``; tests call these functions directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from orchestrator.config import EngineConfig
from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig, OptimizerConfig
from strategies.engines.base import Engine, build_engine
from strategies.models.heads import auxiliary_net, linear_head
from strategies.models.loss import task_loss
from strategies.models.network import build_network, seeded
from strategies.models.units import (
    Shape,
    UnitProfile,
    forward_flops,
    profile_network,
    unit_shapes,
)
from strategies.optim import build_optimizer

AuxHead = Literal["linear", "augmented"]


def auglocal_depths(num_local: int, max_depth: int) -> list[int]:
    """Aux-net depth of each local block: linear from ``max_depth`` down to 1 (AugLocal §3.3;
    the reference code's ``aux_depth_list`` in ``networks/resnet.py``)."""
    if num_local <= 0:
        return []
    if num_local == 1:
        return [max_depth]
    last = num_local - 1
    return [max(1, round(max_depth * (1 - k / last) + k / last)) for k in range(num_local)]


def auglocal_layer_choice(last_layer: int, num_layers: int, depth: int) -> list[int]:
    """Indices of the layers (units) after ``last_layer`` the aux net copies, uniformly
    spaced (the reference code's ``unifSamp`` rule).

    The deepest layer is always included, so every aux net ends with the
    representation the real classifier sees; with fewer layers left than ``depth``
    all of them are used.
    """
    following = num_layers - 1 - last_layer
    if following <= 0:
        raise ValueError(f"layer {last_layer} of {num_layers} has no layers after it")
    if depth >= following:
        return list(range(last_layer + 1, num_layers))
    step = following / depth
    return [round(last_layer + step * i) for i in range(1, depth + 1)]


@dataclass(frozen=True)
class BlockPlan:
    """Which units a block owns and which units its aux net copies."""

    index: int
    units: tuple[int, ...]
    is_last: bool
    aux_units: tuple[int, ...] = ()


def _aux_units(
    aux_head: AuxHead, block: int, last_unit: int, num_units: int, depths: list[int]
) -> tuple[int, ...]:
    if aux_head == "linear":
        return ()
    return tuple(auglocal_layer_choice(last_unit, num_units, depths[block]))


def _too_many_blocks(blocks: int, kind: str, units: list[UnitProfile]) -> ConfigError:
    listed = ", ".join(f"{i}: {u.name} -> {u.out_shape}" for i, u in enumerate(units))
    return ConfigError(
        f"strategy.blocks: {blocks} blocks but the {kind} model has {len(units)} units "
        f"({listed}); allowed: 1..{len(units)}"
    )


def plan_blocks(
    model: ModelConfig, spec: InputSpec, blocks: int, aux_head: AuxHead, aux_depth: int
) -> list[BlockPlan]:
    """Cut the units into ``blocks`` contiguous blocks that cost about the same.

    A pipeline runs at the pace of its slowest block, so the cut minimises the largest
    block cost *including its head* (dynamic programming over cut points). Costs are
    forward FLOPs measured on a dry run (``strategies.models.units``): backward costs
    about twice the forward for every layer type, so the forward ranks blocks the same.
    """
    profile = profile_network(build_network(model, spec, seed=0), spec)
    units = profile[:-1]
    num_units = len(units)
    if not 1 <= blocks <= num_units:
        raise _too_many_blocks(blocks, model.kind, units)
    shapes = [u.out_shape for u in units]
    depths = auglocal_depths(blocks - 1, aux_depth)
    before = [0]  # before[i]: FLOPs of units 0..i-1
    for unit in units:
        before.append(before[-1] + unit.flops)
    heads: dict[tuple[int, ...], int] = {}

    def head_cost(last_unit: int, aux: tuple[int, ...]) -> int:
        key = (last_unit, *aux)
        if key not in heads:
            with torch.random.fork_rng(devices=[]):
                head = build_aux_head(model, spec, aux, shapes[last_unit], shapes)
            heads[key] = forward_flops(head, shapes[last_unit])
        return heads[key]

    def cost(block: int, start: int, end: int) -> int:
        body = before[end] - before[start]
        if block == blocks - 1:
            return body + profile[-1].flops
        aux = _aux_units(aux_head, block, end - 1, num_units, depths)
        return body + head_cost(end - 1, aux)

    inf = float("inf")
    # best[k][e]: the smallest possible largest cost of blocks 0..k covering units [0, e).
    best = [[inf] * (num_units + 1) for _ in range(blocks)]
    cut = [[0] * (num_units + 1) for _ in range(blocks)]
    # Block k must leave at least one unit for each of the blocks after it.
    for end in range(1, num_units - blocks + 2):
        best[0][end] = cost(0, 0, end)
    for k in range(1, blocks):
        for end in range(k + 1, num_units - blocks + k + 2):
            for start in range(k, end):
                value = max(best[k - 1][start], cost(k, start, end))
                if value < best[k][end]:
                    best[k][end], cut[k][end] = value, start
    bounds, end = [], num_units
    for k in range(blocks - 1, -1, -1):
        start = cut[k][end] if k > 0 else 0
        bounds.append((start, end))
        end = start
    bounds.reverse()
    return [
        BlockPlan(
            index=k,
            units=tuple(range(start, end)),
            is_last=k == blocks - 1,
            aux_units=()
            if k == blocks - 1
            else _aux_units(aux_head, k, end - 1, num_units, depths),
        )
        for k, (start, end) in enumerate(bounds)
    ]


def build_aux_head(
    model: ModelConfig,
    spec: InputSpec,
    aux_units: tuple[int, ...],
    shape: Shape,
    shapes: list[Shape],
) -> nn.Module:
    """The local head of a non-final block whose output has ``shape``: the linear head,
    or with ``aux_units`` AugLocal's aux net copying those units."""
    if not aux_units:
        return linear_head(shape, spec)
    return auxiliary_net(model, spec, aux_units, shape, shapes)


@dataclass(frozen=True)
class BatchStats:
    loss: float
    correct: int
    count: int
    applied: bool = True  # False: run.nonfinite: skip dropped this batch's update
    skipped: int = 0  # optimizer steps this batch's update dropped (0 or 1)


class LocalBlock:
    """A block's units, its head and the engine that updates them: what a ``BlockWorker``
    holds.

    For the final block the head is the network's own output layer, so its "local"
    loss is the ordinary training loss.
    """

    def __init__(self, body: nn.Module, head: nn.Module, engine: Engine):
        self.body = body
        self.head = head
        self.engine = engine
        self.optimizer = engine.optimizer  # its learning rate is the block's

    def parameters(self) -> list[nn.Parameter]:
        """Each once, though the body and head share one (tied embeddings, one block)."""
        return list(nn.ModuleList([self.body, self.head]).parameters())

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, BatchStats]:
        """Forward, update on the local loss, and return the activation cut from the graph."""
        self.body.train()
        self.head.train()
        with self.engine.autocast():
            hidden = self.body(x.detach())  # the block before never sees this loss
            loss, hits, count = task_loss(self.head(hidden), y)
        skipped = self.engine.skipped
        self.engine.update(loss)
        stats = BatchStats(
            float(loss.detach()),
            int(hits),
            count,
            self.engine.applied,
            self.engine.skipped - skipped,
        )
        return hidden.detach(), stats

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, BatchStats]:
        self.body.eval()
        self.head.eval()
        with self.engine.autocast():
            hidden = self.body(x)
            loss, hits, count = task_loss(self.head(hidden), y, reduction="sum")
        return hidden, BatchStats(float(loss), int(hits), count)

    def state(self) -> dict[str, object]:
        return {
            "body": self.body.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.engine.state(),
        }

    def restore(self, state: dict[str, object]) -> None:
        self.body.load_state_dict(state["body"])
        self.head.load_state_dict(state["head"])
        self.engine.load(state["optimizer"])


@dataclass(frozen=True)
class BlockSpec:
    """Everything a worker needs to build its block, identically after every restart."""

    plan: BlockPlan
    model: ModelConfig
    input: InputSpec
    seed: int
    optimizer: OptimizerConfig
    lr: float
    device: str = "cpu"
    engine: EngineConfig = field(default_factory=EngineConfig)
    skip_nonfinite: bool = False  # run.nonfinite: skip


def build_block(spec: BlockSpec) -> LocalBlock:
    """Slice the block's units out of the seeded full network (so K-block and end-to-end
    runs start from the same weights) and give it a head initialised from its own seed."""
    network = build_network(spec.model, spec.input, spec.seed)
    body = nn.Sequential(*(network[i] for i in spec.plan.units))
    if spec.plan.is_last:
        head: nn.Module = network[-1]
    else:
        shapes = unit_shapes(network, spec.input)
        last = spec.plan.units[-1]
        with seeded(spec.seed * 1_000 + spec.plan.index + 1):
            head = build_aux_head(spec.model, spec.input, spec.plan.aux_units, shapes[last], shapes)
    body.to(spec.device)
    head.to(spec.device)
    params = list(nn.ModuleList([body, head]).parameters())
    optimizer = build_optimizer(params, spec.optimizer, spec.lr)
    engine = build_engine(spec.engine, [body, head], optimizer, spec.device, spec.skip_nonfinite)
    return LocalBlock(body, head, engine)
