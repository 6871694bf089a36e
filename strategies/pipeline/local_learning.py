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
  linearly from ``aux_depth`` for the first block to 1 for the last local block;
* ``projection``: Mono-Forward (Gong et al., arXiv:2501.09238): a bias-free projection of
  the block's activations to the classes.

With ``momentum`` (MAN, Su et al., ECCV 2024) a non-final block's head first runs an
exponential moving average of the next block's first unit plus a learnable copy of it
(``strategies.models.heads.MomentumAuxHead``).

No Ray here: workers wrap ``LocalBlock``; tests call these functions directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from orchestrator.config import EngineConfig
from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig, OptimizerConfig
from strategies.engines.base import Engine, build_engine
from strategies.models.heads import (
    MomentumAuxHead,
    auxiliary_net,
    ema_update_,
    linear_head,
    projection_head,
)
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
from strategies.pipeline.config import ForwardForwardConfig

if TYPE_CHECKING:
    from strategies.pipeline.forward_forward import ForwardForwardBlock

AuxHead = Literal["linear", "augmented", "projection"]


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
    head: AuxHead = "linear"
    momentum_unit: int | None = None
    """MAN: the next block's first unit, whose moving average the head runs first."""


def _aux_units(
    aux_head: AuxHead, block: int, last_unit: int, num_units: int, depths: list[int]
) -> tuple[int, ...]:
    """AugLocal's copied units after ``last_unit`` (none where no unit follows it: a MAN
    head whose moving-average unit is the network's last reads out directly)."""
    if aux_head != "augmented" or last_unit >= num_units - 1:
        return ()
    return tuple(auglocal_layer_choice(last_unit, num_units, depths[block]))


def _too_many_blocks(blocks: int, kind: str, units: list[UnitProfile]) -> ConfigError:
    listed = ", ".join(f"{i}: {u.name} -> {u.out_shape}" for i, u in enumerate(units))
    return ConfigError(
        f"strategy.blocks: {blocks} blocks but the {kind} model has {len(units)} units "
        f"({listed}); allowed: 1..{len(units)}"
    )


def plan_blocks(
    model: ModelConfig,
    spec: InputSpec,
    blocks: int,
    aux_head: AuxHead,
    aux_depth: int,
    momentum: bool = False,
) -> list[BlockPlan]:
    """Cut the units into ``blocks`` contiguous blocks that cost about the same;
    ``momentum``: MAN heads (their moving-average and learnable units count in the cost).

    A pipeline runs at the pace of its slowest block, so the cut minimises the largest
    block cost *including its head* (dynamic programming over cut points). Costs are
    forward FLOPs measured on a dry run (``strategies.models.units``): backward costs
    about twice the forward for every layer type, so the forward ranks blocks the same.
    """
    network = build_network(model, spec, seed=0)
    profile = profile_network(network, spec)
    units = profile[:-1]
    num_units = len(units)
    if not 1 <= blocks <= num_units:
        raise _too_many_blocks(blocks, model.kind, units)
    shapes = [u.out_shape for u in units]
    depths = auglocal_depths(blocks - 1, aux_depth)
    before = [0]  # before[i]: FLOPs of units 0..i-1
    for unit in units:
        before.append(before[-1] + unit.flops)
    heads: dict[BlockPlan, int] = {}

    def head_plan(block: int, last_unit: int) -> BlockPlan:
        """The head of ``block`` ending at ``last_unit`` (its index and units aside)."""
        after = last_unit + 1 if momentum else last_unit
        return BlockPlan(
            index=0,
            units=(last_unit,),
            is_last=False,
            aux_units=_aux_units(aux_head, block, after, num_units, depths),
            head=aux_head,
            momentum_unit=last_unit + 1 if momentum else None,
        )

    def head_cost(plan: BlockPlan) -> int:
        if plan not in heads:
            with torch.random.fork_rng(devices=[]):
                head = build_local_head(model, spec, plan, shapes, network.__getitem__)
            heads[plan] = forward_flops(head, shapes[plan.units[-1]])
        return heads[plan]

    def cost(block: int, start: int, end: int) -> int:
        body = before[end] - before[start]
        if block == blocks - 1:
            return body + profile[-1].flops
        return body + head_cost(head_plan(block, end - 1))

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
    plans = []
    for k, (start, end) in enumerate(bounds):
        units_k = tuple(range(start, end))
        if k == blocks - 1:
            plans.append(BlockPlan(index=k, units=units_k, is_last=True))
            continue
        head = head_plan(k, end - 1)
        plans.append(
            BlockPlan(
                index=k,
                units=units_k,
                is_last=False,
                aux_units=head.aux_units,
                head=aux_head,
                momentum_unit=head.momentum_unit,
            )
        )
    return plans


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


def build_local_head(
    model: ModelConfig,
    spec: InputSpec,
    plan: BlockPlan,
    shapes: list[Shape],
    fresh_unit: Callable[[int], nn.Module],
) -> nn.Module:
    """The head ``plan`` gives a non-final block; ``fresh_unit(j)``: a newly initialised
    module like unit ``j`` (called twice for a MAN head: its two copies start apart)."""
    shape = shapes[plan.units[-1]]
    if plan.momentum_unit is None:
        if plan.head == "projection":
            return projection_head(shape, spec)
        return build_aux_head(model, spec, plan.aux_units, shape, shapes)
    unit = plan.momentum_unit
    ema, learnable = fresh_unit(unit), fresh_unit(unit)
    readout = build_aux_head(model, spec, plan.aux_units, shapes[unit], shapes)
    return MomentumAuxHead(ema, learnable, readout)


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

    def first_unit(self) -> dict[str, torch.Tensor]:
        """The first unit's parameters on the CPU: what the block before follows (MAN)."""
        return {k: v.detach().cpu() for k, v in self.body[0].named_parameters()}

    def follow(self, first_unit: dict[str, torch.Tensor], momentum: float) -> None:
        """Move a MAN head's moving average towards the next block's ``first_unit``."""
        if not isinstance(self.head, MomentumAuxHead):
            raise RuntimeError("follow() is for a block with a momentum auxiliary head")
        ema_update_(dict(self.head.ema.named_parameters()), first_unit, momentum)

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
    def eval_step(
        self, x: torch.Tensor, y: torch.Tensor, carry: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, BatchStats, torch.Tensor | None]:
        """``carry``: what a rule passes along the eval chain beside the activations
        (Forward-Forward's running goodness per label); cross-entropy blocks need none."""
        self.body.eval()
        self.head.eval()
        with self.engine.autocast():
            hidden = self.body(x)
            loss, hits, count = task_loss(self.head(hidden), y, reduction="sum")
        return hidden, BatchStats(float(loss), int(hits), count), carry

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
    forward_forward: ForwardForwardConfig | None = None
    """Set: the block learns by Forward-Forward (``strategies.pipeline.forward_forward``)."""


def build_block(spec: BlockSpec) -> LocalBlock | ForwardForwardBlock:
    """Slice the block's units out of the seeded full network (so K-block and end-to-end
    runs start from the same weights) and give it a head initialised from its own seed.
    A Forward-Forward block is built by its own module (no head, a wider first layer)."""
    if spec.forward_forward is not None:
        from strategies.pipeline.forward_forward import build_forward_forward_block

        return build_forward_forward_block(spec)
    network = build_network(spec.model, spec.input, spec.seed)
    body = nn.Sequential(*(network[i] for i in spec.plan.units))
    if spec.plan.is_last:
        head: nn.Module = network[-1]
    else:
        shapes = unit_shapes(network, spec.input)
        head_seed = spec.seed * 1_000 + spec.plan.index + 1
        copies = iter(range(1, 3))

        def fresh_unit(unit: int) -> nn.Module:
            # MAN's copies: the unit as its family initialises it, from seeds of their own.
            return build_network(spec.model, spec.input, head_seed * 10 + next(copies))[unit]

        with seeded(head_seed):
            head = build_local_head(spec.model, spec.input, spec.plan, shapes, fresh_unit)
    body.to(spec.device)
    head.to(spec.device)
    # A MAN head's moving average is not trained: the optimizer never holds it.
    params = [p for p in nn.ModuleList([body, head]).parameters() if p.requires_grad]
    optimizer = build_optimizer(params, spec.optimizer, spec.lr)
    engine = build_engine(spec.engine, [body, head], optimizer, spec.device, spec.skip_nonfinite)
    return LocalBlock(body, head, engine)
