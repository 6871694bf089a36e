"""Local learning: cut a network into blocks, give each a head and a loss of its own.

Block k computes ``h_k = body_k(h_{k-1}.detach())`` and updates on
``CE(head_k(h_k), y)`` at once, so no block waits for a backward pass from above
(the update locking that local learning removes). Two kinds of head:

* ``linear``: one linear classifier on the block's output (DGL/greedy layer-wise style);
* ``augmented``: AugLocal (Ma et al., ICLR 2024): the head is a fresh copy of a
  *uniformly chosen subset* of the layers after the block, then the classifier, so the
  local objective sees the kind of computation that follows; its depth falls linearly
  from ``aux_depth`` for the first block to 1 for the last local block.

No Ray here: workers wrap ``LocalBlock``; tests call these functions directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from strategies.config import ModelConfig, OptimizerConfig
from strategies.network import build_network, hidden_layer, layer_widths
from strategies.optim import build_optimizer

AuxHead = Literal["linear", "augmented"]


def auglocal_depths(num_local: int, max_depth: int) -> list[int]:
    """Aux-net depth of each local block: linear from ``max_depth`` down to 1 (AugLocal §3.3)."""
    if num_local <= 0:
        return []
    if num_local == 1:
        return [max_depth]
    last = num_local - 1
    return [max(1, round(max_depth * (1 - k / last) + k / last)) for k in range(num_local)]


def auglocal_layer_choice(last_layer: int, num_layers: int, depth: int) -> list[int]:
    """Indices of the layers after ``last_layer`` the aux net copies, uniformly spaced.

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
    """Which hidden layers a block owns and which layers its aux net copies."""

    index: int
    layers: tuple[int, ...]
    is_last: bool
    aux_layers: tuple[int, ...] = ()


def _aux_layers(
    aux_head: AuxHead, block: int, last_layer: int, num_layers: int, depths: list[int]
) -> tuple[int, ...]:
    if aux_head == "linear":
        return ()
    return tuple(auglocal_layer_choice(last_layer, num_layers, depths[block]))


def _block_cost(
    widths: list[int], layers: range, aux: tuple[int, ...], num_classes: int, is_last: bool
) -> int:
    """Weights touched per sample: forward and backward FLOPs of an MLP are proportional."""
    cost = sum(widths[i] * widths[i + 1] for i in layers)
    if is_last:
        return cost + widths[-1] * num_classes
    width = widths[layers[-1] + 1]
    for layer in aux:
        cost += width * widths[layer + 1]
        width = widths[layer + 1]
    return cost + width * num_classes


def plan_blocks(
    model: ModelConfig,
    num_features: int,
    num_classes: int,
    blocks: int,
    aux_head: AuxHead,
    aux_depth: int,
) -> list[BlockPlan]:
    """Cut the hidden layers into ``blocks`` contiguous blocks that cost about the same.

    A pipeline runs at the pace of its slowest block, so the cut minimises the largest
    block cost *including its aux head* (dynamic programming over cut points).
    """
    num_layers = len(model.hidden)
    if not 1 <= blocks <= num_layers:
        raise ValueError(f"{blocks} blocks need 1..{num_layers} hidden layers")
    widths = layer_widths(model, num_features)
    depths = auglocal_depths(blocks - 1, aux_depth)

    def cost(block: int, start: int, end: int) -> int:
        is_last = block == blocks - 1
        aux = () if is_last else _aux_layers(aux_head, block, end - 1, num_layers, depths)
        return _block_cost(widths, range(start, end), aux, num_classes, is_last)

    inf = float("inf")
    # best[k][e]: the smallest possible largest cost of blocks 0..k covering layers [0, e).
    best = [[inf] * (num_layers + 1) for _ in range(blocks)]
    cut = [[0] * (num_layers + 1) for _ in range(blocks)]
    # Block k must leave at least one layer for each of the blocks after it.
    for end in range(1, num_layers - blocks + 2):
        best[0][end] = cost(0, 0, end)
    for k in range(1, blocks):
        for end in range(k + 1, num_layers - blocks + k + 2):
            for start in range(k, end):
                value = max(best[k - 1][start], cost(k, start, end))
                if value < best[k][end]:
                    best[k][end], cut[k][end] = value, start
    bounds, end = [], num_layers
    for k in range(blocks - 1, -1, -1):
        start = cut[k][end] if k > 0 else 0
        bounds.append((start, end))
        end = start
    bounds.reverse()
    return [
        BlockPlan(
            index=k,
            layers=tuple(range(start, end)),
            is_last=k == blocks - 1,
            aux_layers=()
            if k == blocks - 1
            else _aux_layers(aux_head, k, end - 1, num_layers, depths),
        )
        for k, (start, end) in enumerate(bounds)
    ]


def build_aux_head(
    plan: BlockPlan, model: ModelConfig, num_features: int, num_classes: int
) -> nn.Module:
    """The local head of a non-final block: copies of ``plan.aux_layers``, then a classifier."""
    widths = layer_widths(model, num_features)
    width = widths[plan.layers[-1] + 1]
    parts: list[nn.Module] = []
    for layer in plan.aux_layers:
        parts.append(hidden_layer(width, widths[layer + 1], model))
        width = widths[layer + 1]
    parts.append(nn.Linear(width, num_classes))
    return nn.Sequential(*parts)


@dataclass(frozen=True)
class BatchStats:
    loss: float
    correct: int
    count: int


class LocalBlock:
    """A block's layers, its head and their optimizer: the unit a ``BlockWorker`` holds.

    For the final block the head is the network's own output layer, so its "local"
    loss is the ordinary training loss.
    """

    def __init__(self, body: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer):
        self.body = body
        self.head = head
        self.optimizer = optimizer

    def parameters(self) -> list[nn.Parameter]:
        return [*self.body.parameters(), *self.head.parameters()]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, BatchStats]:
        """Forward, update on the local loss, and return the activation cut from the graph."""
        self.body.train()
        self.head.train()
        hidden = self.body(x)
        logits = self.head(hidden)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        correct = int((logits.detach().argmax(dim=1) == y).sum())
        return hidden.detach(), BatchStats(float(loss.detach()), correct, int(y.numel()))

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, BatchStats]:
        self.body.eval()
        self.head.eval()
        hidden = self.body(x)
        logits = self.head(hidden)
        loss = F.cross_entropy(logits, y, reduction="sum")
        correct = int((logits.argmax(dim=1) == y).sum())
        return hidden, BatchStats(float(loss), correct, int(y.numel()))

    def state(self) -> dict[str, object]:
        return {
            "body": self.body.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def restore(self, state: dict[str, object]) -> None:
        self.body.load_state_dict(state["body"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


@dataclass(frozen=True)
class BlockSpec:
    """Everything a worker needs to build its block, identically after every restart."""

    plan: BlockPlan
    model: ModelConfig
    num_features: int
    num_classes: int
    seed: int
    optimizer: OptimizerConfig
    lr: float
    device: str = "cpu"


def build_block(spec: BlockSpec) -> LocalBlock:
    """Slice the block's layers out of the seeded full network (so K-block and end-to-end
    runs start from the same weights) and give it a head initialised from its own seed."""
    network = build_network(spec.model, spec.num_features, spec.num_classes, spec.seed)
    body = nn.Sequential(*(network[i] for i in spec.plan.layers))
    if spec.plan.is_last:
        head: nn.Module = network[-1]
    else:
        state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed * 1_000 + spec.plan.index + 1)
        try:
            head = build_aux_head(spec.plan, spec.model, spec.num_features, spec.num_classes)
        finally:
            torch.random.set_rng_state(state)
    body.to(spec.device)
    head.to(spec.device)
    params = [*body.parameters(), *head.parameters()]
    return LocalBlock(body, head, build_optimizer(params, spec.optimizer, spec.lr))
