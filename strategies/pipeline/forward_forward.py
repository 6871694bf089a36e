"""Forward-Forward (Hinton, arXiv:2212.13345) as a local rule of the pipeline: one MLP layer
per block, no heads, no backward pass between layers.

Each layer's *goodness* is the sum of its squared activities; the layer pushes it above a
threshold for positive rows (the example with its true label written in) and below it for
negative rows (the same example with a wrong label), by the logistic loss
``-log σ(g_pos - θ) - log(1 - σ(g_neg - θ))`` at temperature 1. As in Hinton's Matlab code
(``ffcode.zip``: ``ffnew.m``, ``ffnormrows.m``, ``ffenergytest.m``):

* θ is the layer's width (``layernums{l}``), for goodness summed over its units;
* the input rows and every layer's output are scaled to RMS 1 before the next layer reads
  them, so a layer cannot hand its own goodness on: the next one sees only the direction;
* a prediction runs every candidate label through the net and picks the label with the
  most goodness summed over the layers, skipping the first hidden layer when there are
  more (``minlevelenergy = 3``).

Negatives here are uniformly random wrong labels (the paper's supervised scheme); the
Matlab code's "hard" negatives, sampled from a softmax readout, need that readout and are
not built. No Ray here: ``workers.block.BlockWorker`` wraps ``ForwardForwardBlock``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig
from strategies.engines.base import Engine, build_engine
from strategies.models.network import build_network
from strategies.optim import build_optimizer
from strategies.pipeline.config import ForwardForwardConfig
from strategies.pipeline.local_learning import BatchStats, BlockSpec

LabelInput = Literal["concat", "overwrite"]

_EPS = 1e-8


def rms_normalise(h: torch.Tensor) -> torch.Tensor:
    """Each row scaled to root-mean-square 1 (``ffnormrows.m``: sum of squares = width, which
    is why θ = width); an all-zero row stays zero. Computed in fp32, returned in h's dtype."""
    rows = h.float()
    rms = rows.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return (rows / (rms + _EPS)).to(h.dtype)


def embed_label(
    x: torch.Tensor, labels_or_probs: torch.Tensor, num_classes: int, how: LabelInput
) -> torch.Tensor:
    """The rows of ``x`` [N, F] with a label vector written in: class ids [N] become one-hot
    rows, a float [N, C] is taken as is (a neutral row is 1/C everywhere, Hinton's 0.1).

    ``overwrite`` puts it over the first C features (the paper's MNIST border pixels);
    ``concat`` appends it, giving F + C features.
    """
    if labels_or_probs.dtype.is_floating_point:
        vector = labels_or_probs.to(x.dtype)
    else:
        vector = F.one_hot(labels_or_probs, num_classes).to(x.dtype)
    if vector.shape != (x.shape[0], num_classes):
        raise ValueError(
            f"label vectors of shape {tuple(vector.shape)} for {x.shape[0]} rows and "
            f"{num_classes} classes"
        )
    if how == "concat":
        return torch.cat([x, vector], dim=1)
    if x.shape[1] < num_classes:
        raise ValueError(f"cannot overwrite {num_classes} label features of {x.shape[1]}")
    out = x.clone()
    out[:, :num_classes] = vector
    return out


def wrong_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A class other than ``y`` for each row, uniform over the C - 1 others: ``y`` plus an
    offset in 1..C-1, modulo C (a random permutation of the batch's labels, as some
    reference code draws them, hits the true label about 1/C of the time)."""
    offset = torch.randint(1, num_classes, y.shape, generator=generator)
    return (y + offset.to(y.device)) % num_classes


def goodness(h: torch.Tensor) -> torch.Tensor:
    """Sum of squared activities per row, in fp32 (a sum of thousands of bf16 squares
    would lose the margin to θ)."""
    return h.float().pow(2).sum(dim=-1)


def ff_loss(
    g_pos: torch.Tensor,
    g_neg: torch.Tensor,
    threshold: float,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """``softplus(θ - g_pos)`` and ``softplus(g_neg - θ)`` over all rows, i.e.
    ``-log σ(g_pos - θ) - log(1 - σ(g_neg - θ))``: Hinton's logistic at temperature 1."""
    terms = torch.cat([F.softplus(threshold - g_pos), F.softplus(g_neg - threshold)])
    return terms.mean() if reduction == "mean" else terms.sum()


def ff_loss_over_labels(scores: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
    """The held-out FF loss of ``scores`` [B, C] (goodness of each label copy), summed over
    the examples: per example, half the positive term of its true label plus half the mean
    negative term of the C - 1 wrong ones, the expected value of the training loss per row
    (which draws one wrong label per example), so loss / B compares with ``train`` loss."""
    true = F.one_hot(y, scores.shape[1]).bool()
    pos = F.softplus(threshold - scores[true])
    neg = F.softplus(scores - threshold).masked_fill(true, 0).sum(dim=1) / (scores.shape[1] - 1)
    return 0.5 * (pos + neg).sum()


def label_copies(x: torch.Tensor, num_classes: int, how: LabelInput) -> torch.Tensor:
    """Every candidate label written into every example, RMS-normalised: row ``i * C + c`` is
    example i with label c, the layout ``label_scores`` reads back."""
    rows = x.repeat_interleave(num_classes, dim=0)
    labels = torch.arange(num_classes, device=x.device).repeat(x.shape[0])
    return rms_normalise(embed_label(rows, labels, num_classes, how))


def label_scores(g: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    """The goodness of ``label_copies``' rows as [B, C]: example i's score for label c."""
    if g.numel() != batch * num_classes:
        raise ValueError(f"{g.numel()} goodness values for {batch} examples x {num_classes} labels")
    return g.reshape(batch, num_classes)


def counts_goodness(index: int, is_last: bool, skip_first: bool) -> bool:
    """Whether layer ``index`` adds its goodness to the prediction: all do, except the first
    with ``skip_first`` when another layer follows it (Hinton's code, ``minlevelenergy``)."""
    return not (skip_first and index == 0 and not is_last)


def input_width(spec: InputSpec, ff: ForwardForwardConfig) -> int:
    """Features the first layer reads once the label is in: F + C with ``concat``, F with
    ``overwrite`` (which needs F >= C)."""
    if spec.kind != "table":
        raise ConfigError(
            f"strategy.local_rule: forward_forward writes the label into tabular features; "
            f"the data's examples are {spec.kind} of shape {spec.shape}: use a table (MLP) data "
            "set or another local_rule"
        )
    features, classes = spec.shape[0], spec.num_classes
    if ff.label_input == "concat":
        return features + classes
    if features < classes:
        raise ConfigError(
            f"strategy.forward_forward.label_input: 'overwrite' writes the {classes}-class "
            f"label over the first {classes} features, but the examples have {features}; set "
            "label_input: concat (appends the label instead)"
        )
    return features


def labelled_input(spec: InputSpec, ff: ForwardForwardConfig) -> InputSpec:
    """The examples as a Forward-Forward network reads them: the label written in."""
    return InputSpec("table", (input_width(spec, ff),), spec.num_classes)


class ForwardForwardBlock:
    """One layer trained by Forward-Forward: what a ``BlockWorker`` holds in place of a
    ``LocalBlock`` (same surface; ``head`` is empty, FF has none).

    Training rows are 2B per batch: B positive then B negative; the first block builds them
    from the raw examples, later blocks receive them from the block before (the worker
    passes the B labels on unchanged). Evaluation rows are C per example (every candidate
    label) and a ``carry`` [B, C] accumulates the goodness block to block.
    """

    def __init__(
        self,
        body: nn.Module,
        engine: Engine,
        *,
        num_classes: int,
        label_input: LabelInput,
        threshold: float,
        first: bool,
        counted: bool,
        seed: int,
    ) -> None:
        """``first``: reads raw examples and writes the labels in; ``counted``: its goodness
        enters the prediction (``counts_goodness``); ``seed``: of the wrong-label draws."""
        self.body = body
        self.head = nn.Sequential()
        self.engine = engine
        self.optimizer = engine.optimizer
        self.num_classes = num_classes
        self.label_input: LabelInput = label_input
        self.threshold = threshold
        self.first = first
        self.counted = counted
        self.negatives = torch.Generator().manual_seed(seed)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.body.parameters())

    def _rows(self, x: torch.Tensor, batch: int, copies: int, what: str) -> torch.Tensor:
        """A later block's inbound rows, checked against the batch's labels."""
        if x.shape[0] != copies * batch:
            raise ValueError(
                f"a Forward-Forward block expects {copies} {what} rows per example: got "
                f"{x.shape[0]} rows for {batch} labels"
            )
        return x.detach()

    def _positive_negative(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[2B, F'] normalised rows: x with its labels, then x with wrong labels."""
        wrong = wrong_labels(y, self.num_classes, self.negatives)
        rows = torch.cat(
            [
                embed_label(x, y, self.num_classes, self.label_input),
                embed_label(x, wrong, self.num_classes, self.label_input),
            ]
        )
        return rms_normalise(rows)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, BatchStats]:
        """Update on the layer's FF loss; return its output normalised and cut from the graph.

        ``correct`` counts the examples whose positive row is above θ and negative row below
        it, out of B (examples, so throughput counts examples, not rows): under FF the
        training accuracy is this discrimination accuracy, not a classification one.
        """
        self.body.train()
        batch = y.shape[0]
        if self.first:
            rows = self._positive_negative(x, y)
        else:
            rows = self._rows(x, batch, 2, "positive-then-negative")
        with self.engine.autocast():
            hidden = self.body(rows)
            g = goodness(hidden)
            g_pos, g_neg = g[:batch], g[batch:]
            loss = ff_loss(g_pos, g_neg, self.threshold)
        skipped = self.engine.skipped
        self.engine.update(loss)
        with torch.no_grad():
            correct = ((g_pos > self.threshold) & (g_neg < self.threshold)).sum()
        stats = BatchStats(
            float(loss.detach()),
            int(correct),
            batch,
            self.engine.applied,
            self.engine.skipped - skipped,
        )
        return rms_normalise(hidden.detach()), stats

    @torch.no_grad()
    def eval_step(
        self, x: torch.Tensor, y: torch.Tensor, carry: torch.Tensor | None
    ) -> tuple[torch.Tensor, BatchStats, torch.Tensor]:
        """Score every candidate label; ``carry`` [B, C] (None at the first block) sums the
        goodness of the counted layers so far, and its argmax is the prediction.

        ``correct``: hits of that argmax; a first block left out of the sum scores its own
        goodness instead, so its accuracy still says what the layer has learnt. ``loss``:
        ``ff_loss_over_labels`` of this layer's goodness, a sum over the B examples.
        """
        self.body.eval()
        batch = y.shape[0]
        if self.first:
            rows = label_copies(x, self.num_classes, self.label_input)
        else:
            rows = self._rows(x, batch, self.num_classes, "label-copy")
        with self.engine.autocast():
            hidden = self.body(rows)
        scores = label_scores(goodness(hidden), batch, self.num_classes)
        if carry is None:
            carry = torch.zeros_like(scores)
        if self.counted:
            carry = carry + scores
        judged = carry if self.counted else scores
        hits = (judged.argmax(dim=1) == y).sum()
        loss = ff_loss_over_labels(scores, y, self.threshold)
        return rms_normalise(hidden), BatchStats(float(loss), int(hits), batch), carry

    def state(self) -> dict[str, object]:
        """Weights, optimizer and the wrong-label generator, so a restored run draws the
        same negatives as an uninterrupted one."""
        return {
            "body": self.body.state_dict(),
            "optimizer": self.engine.state(),
            "negatives": self.negatives.get_state(),
        }

    def restore(self, state: dict[str, object]) -> None:
        self.body.load_state_dict(state["body"])
        self.engine.load(state["optimizer"])
        self.negatives.set_state(state["negatives"])


def negatives_seed(seed: int, index: int) -> int:
    """The wrong-label generator's seed of block ``index``: apart from the block's other
    seeds (``seed * 1000 + index`` for dropout, ``+ 1`` for heads)."""
    return seed * 1_000 + 500 + index


def build_forward_forward_block(spec: BlockSpec) -> ForwardForwardBlock:
    """Slice the block's one layer out of the seeded network built for the labelled input
    width (so any number of blocks starts from the same weights), as ``build_block`` does."""
    ff = spec.forward_forward
    if ff is None:
        raise ValueError("build_forward_forward_block needs spec.forward_forward")
    if len(spec.plan.units) != 1:
        raise ConfigError(
            f"strategy.blocks: block {spec.plan.index} holds layers {list(spec.plan.units)}; "
            "Forward-Forward gives each layer its own goodness: set blocks to the number of "
            "model.hidden layers"
        )
    (unit,) = spec.plan.units
    network = build_network(spec.model, labelled_input(spec.input, ff), spec.seed)
    body = nn.Sequential(network[unit]).to(spec.device)
    width = spec.model.hidden[unit]
    optimizer = build_optimizer(body.parameters(), spec.optimizer, spec.lr)
    engine = build_engine(spec.engine, [body], optimizer, spec.device, spec.skip_nonfinite)
    return ForwardForwardBlock(
        body,
        engine,
        num_classes=spec.input.num_classes,
        label_input=ff.label_input,
        threshold=float(width) if ff.threshold is None else ff.threshold,
        first=spec.plan.index == 0,
        counted=counts_goodness(spec.plan.index, spec.plan.is_last, ff.skip_first),
        seed=negatives_seed(spec.seed, spec.plan.index),
    )


class ForwardForwardClassifier(nn.Module):
    """The exported Forward-Forward network: ``forward(x [B, F]) -> scores [B, C]``, each
    label's goodness summed over the counted layers, the same computation as the blocks'
    eval chain, so its argmax is FF's prediction."""

    def __init__(
        self,
        units: Sequence[nn.Module],
        num_classes: int,
        label_input: LabelInput,
        skip_first: bool,
    ) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.num_classes = num_classes
        self.label_input: LabelInput = label_input
        self.skip_first = skip_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, last = x.shape[0], len(self.units) - 1
        rows = label_copies(x, self.num_classes, self.label_input)
        scores = torch.zeros(batch, self.num_classes, device=x.device)
        for index, unit in enumerate(self.units):
            hidden = unit(rows)
            if counts_goodness(index, index == last, self.skip_first):
                scores = scores + label_scores(goodness(hidden), batch, self.num_classes)
            rows = rms_normalise(hidden)
        return scores


def forward_forward_classifier(
    ff: ForwardForwardConfig,
    model: ModelConfig,
    spec: InputSpec,
    seed: int,
    exports: Sequence[dict[str, dict[str, torch.Tensor]]],
) -> ForwardForwardClassifier:
    """Assemble the classifier from the blocks' exported bodies (block k holds layer k)."""
    network = build_network(model, labelled_input(spec, ff), seed)
    units = [network[k] for k in range(len(exports))]
    for unit, exported in zip(units, exports):
        nn.Sequential(unit).load_state_dict(exported["body"])
    return ForwardForwardClassifier(units, spec.num_classes, ff.label_input, ff.skip_first)
