"""The update-unlocked pipeline: K blocks on K actors, each trained by its own loss.

For every ``batches_per_call`` batches starting at t the driver submits a chain
``a1 = b1.forward(t..); a2 = b2.forward(a1); ...`` and moves on without waiting, so block k
works on one call's batches while block k+1 works on the previous call's, and activations
travel actor to actor, never through the driver: through the object store, or through one
Ray Compiled Graph over the blocks (``strategy.transport``, ``strategies.pipeline.transport``).
At most ``max_in_flight`` calls are in the pipe (backpressure): enough to keep every block
busy, few enough that queued activations stay bounded.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import ray
import torch

from orchestrator.nonfinite import skipped_figures
from strategies.base import Metrics, Strategy, check_hyperparameters
from strategies.models.loss import with_bits
from strategies.models.network import build_network
from strategies.pipeline.config import PipelineConfig
from strategies.pipeline.local_learning import BlockSpec, plan_blocks
from strategies.pipeline.transport import Transport, open_transport
from workers.block import BlockWorker
from workers.messages import Activations, BatchRange, BlockRecord, Mode

if TYPE_CHECKING:
    from orchestrator.context import RunContext

T = TypeVar("T")


def summarize(
    records: list[list[BlockRecord]], wall_s: float, scope: Literal["train", "eval"] = "train"
) -> Metrics:
    """Per-block and whole-pipeline metrics from each batch's chain of block records.

    A training loss is the mean over the batches whose update the block applied
    (``run.nonfinite: skip`` drops the others; any other policy applies every one); a step
    in which some block applied none reports ``train/loss`` as NaN, so the run stops
    instead of going on with a block that no longer learns."""
    totals: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
    for chain in records:
        for r in chain:
            t = totals[r.block]
            if r.applied:
                t[0] += r.loss
                t[4] += 1
            t[1] += r.correct
            t[2] += r.count
            t[3] += r.end - r.start
    metrics: Metrics = {}
    if not totals:
        return metrics
    per_batch = scope == "train"

    def mean_loss(loss: float, applied: float, count: float) -> float:
        # Training losses are batch means; eval losses are sums over samples.
        if not per_batch:
            return loss / count
        return loss / applied if applied else math.nan

    for block, (loss, correct, count, busy, applied) in sorted(totals.items()):
        name = f"block-{block}/{scope}/"
        metrics[f"{name}local_loss"] = mean_loss(loss, applied, count)
        metrics[f"{name}aux_accuracy"] = correct / count
        if per_batch:
            metrics[f"{name}samples_per_s"] = count / wall_s
            metrics[f"block-{block}/system/busy_fraction"] = min(1.0, busy / wall_s)
    last = max(totals)
    loss, correct, count, _, applied = totals[last]
    stuck = any(t[4] == 0 for t in totals.values())
    metrics[f"{scope}/loss"] = math.nan if per_batch and stuck else mean_loss(loss, applied, count)
    metrics[f"{scope}/accuracy"] = correct / count
    if per_batch:
        metrics["train/samples_per_s"] = count / wall_s
    return metrics


class PipelineStrategy(Strategy[PipelineConfig]):
    Config = PipelineConfig

    def __init__(self, config: PipelineConfig) -> None:
        super().__init__(config)
        self.lrs = list(config.block_lr or [config.optimizer.lr] * config.blocks)
        self.next_batch = 0
        self.spans: dict[str, deque[tuple[float, float]]] = {
            f"block-{k}": deque(maxlen=512) for k in range(config.blocks)
        }

    def setup(self, ctx: RunContext) -> None:
        run = ctx.config
        self.ctx = ctx
        # NCCL joins one rank per GPU: blocks that share a GPU send through the host.
        nccl = (
            self.config.transport == "compiled_graph"
            and ctx.device == "cuda"
            and run.resources.gpus_per_worker >= 1
        )
        info = ctx.dataset
        self.plans = plan_blocks(
            run.model,
            info.input,
            self.config.blocks,
            self.config.head_kind(),
            self.config.aux_depth,
            momentum=self.config.momentum_aux is not None,
        )
        self.workers = [
            ctx.spawn(
                BlockWorker,
                BlockSpec(
                    plan=plan,
                    model=run.model,
                    input=info.input,
                    seed=ctx.seed,
                    optimizer=self.config.optimizer,
                    lr=self.lrs[plan.index],
                    device=ctx.device,
                    engine=run.engine,
                    skip_nonfinite=run.run.nonfinite == "skip",
                    forward_forward=self.config.forward_forward_options(),
                ),
                info,
                run.data.batch_size,
                ctx.threads,
                run.eval.max_batches,
                wire_on_device=nccl,
                role="block",
                index=plan.index,
            )
            for plan in self.plans
        ]
        ray.get([w.pid.remote() for w in self.workers])
        self.transport: Transport = open_transport(
            self.config.transport,
            self.workers,
            self.config.max_in_flight,
            "cuda" if nccl else "cpu",
        )
        self.inflight: deque[Any] = deque()
        self.done: list[list[BlockRecord]] = []
        self.num_test_batches: int | None = None
        # MAN: each block's first unit as of the last step, and the follows sent since the
        # last check (their errors surface where the pipe drains).
        self.next_units: dict[int, Any] = {}
        self.follows: list[Any] = []

    def _closing_on_error(self, action: Callable[[], T]) -> T:
        """``action()``; if it raises (a block died), tear the transport down first, so the
        controller's recovery kills workers no compiled graph still runs on."""
        try:
            return action()
        except BaseException:
            self.close()
            raise

    def _submit(self, mode: Mode, first: int, count: int) -> Any:
        """Send ``count`` batches from ``first`` through every block; a handle to the records."""
        message = BatchRange(mode, first, count)
        return self._closing_on_error(lambda: self.transport.submit(message))

    def _pump(self, mode: Mode, first: int, batches: int) -> None:
        """Submit ``batches`` batches a call at a time, keeping at most ``max_in_flight``
        calls in the pipe; what finishes meanwhile lands in ``done``. The last calls stay
        in flight, so the pipe does not drain between steps."""
        per_call = self.config.call_size()
        for start in range(first, first + batches, per_call):
            self.inflight.append(self._submit(mode, start, min(per_call, first + batches - start)))
            while len(self.inflight) >= self.config.max_in_flight:
                self._collect(self.inflight.popleft())

    def _collect(self, pending: Any) -> None:
        result: Activations = self._closing_on_error(lambda: self.transport.receive(pending))
        self.done.extend(result.records)
        if result.mode == "train":
            for chain in result.records:
                for r in chain:
                    self.spans[f"block-{r.block}"].append((r.start, r.end))

    def _drain(self) -> None:
        while self.inflight:
            self._collect(self.inflight.popleft())

    def _follow_next_blocks(self) -> None:
        """MAN: each block's moving average follows the next block's first unit as it was
        at the end of the last step (fetched then, so no block waits on the one above it),
        by ``momentum ** batches_per_step``: MAN's per-batch average, applied once a step."""
        if self.config.momentum_aux is None:
            return
        momentum = self.config.momentum_aux.momentum**self.config.batches_per_step
        for k in range(len(self.workers) - 1):
            unit = self.next_units.get(k + 1)
            if unit is not None:
                self.follows.append(self.workers[k].follow.remote(unit, momentum))
            self.next_units[k + 1] = self.workers[k + 1].first_unit.remote()

    def _check_follows(self) -> None:
        follows, self.follows = self.follows, []
        self._closing_on_error(lambda: ray.get(follows))

    def step(self) -> Metrics:
        start = time.perf_counter()
        self._follow_next_blocks()
        self._pump("train", self.next_batch, self.config.batches_per_step)
        self.next_batch += self.config.batches_per_step
        if not self.done:  # every step reports: wait for its oldest call if none finished
            self._collect(self.inflight.popleft())
        records, self.done = self.done, []
        metrics = summarize(records, time.perf_counter() - start)
        if self.ctx.config.run.nonfinite == "skip":
            skipped = sum(r.skipped for chain in records for r in chain)
            metrics.update(skipped_figures(skipped, "update"))
        return metrics

    def evaluate(self) -> Metrics:
        """Every held-out batch through the pipe, after the training calls still in it
        (whose records wait for the next step's metrics)."""
        if self.num_test_batches is None:
            self.num_test_batches = ray.get(self.workers[0].num_test_batches.remote())
        self._drain()
        self._check_follows()
        trained, self.done = self.done, []
        self._pump("eval", 0, self.num_test_batches)
        self._drain()
        chains, self.done = self.done, trained
        return with_bits(summarize(chains, 0.0, scope="eval"), self.ctx.dataset.input, "eval")

    def state(self) -> dict[str, Any]:
        self._drain()
        self._check_follows()
        states = ray.get([w.state.remote() for w in self.workers])
        blocks = {f"block-{k}": s for k, s in enumerate(states)}
        return {**blocks, "progress": {"next_batch": self.next_batch, "lrs": list(self.lrs)}}

    def restore(self, state: dict[str, Any]) -> None:
        ray.get([w.restore.remote(state[f"block-{k}"]) for k, w in enumerate(self.workers)])
        self.next_batch = int(state["progress"]["next_batch"])
        self.set_hyperparameters(
            {f"lr/block-{k}": lr for k, lr in enumerate(state["progress"]["lrs"])}
        )

    def hyperparameters(self) -> dict[str, float]:
        return {f"lr/block-{k}": lr for k, lr in enumerate(self.lrs)}

    def set_hyperparameters(self, values: dict[str, float]) -> None:
        check_hyperparameters(values, self.hyperparameters())
        # A compiled graph's loop runs beside the actor's ordinary calls: let the calls in
        # the pipe finish on the old rates, as the object store's call order does.
        self._drain()
        for key, lr in values.items():
            k = int(key.rsplit("-", 1)[1])
            self.lrs[k] = float(lr)
            ray.get(self.workers[k].set_lr.remote(float(lr)))

    def export_model(self) -> torch.nn.Module:
        self._drain()
        run, info = self.ctx.config, self.ctx.dataset
        exports = ray.get([w.export.remote() for w in self.workers])
        options = self.config.forward_forward_options()
        if options is not None:
            from strategies.pipeline.forward_forward import forward_forward_classifier

            return forward_forward_classifier(
                options, run.model, info.input, self.ctx.seed, exports
            )
        network = build_network(run.model, info.input, self.ctx.seed)
        for plan, exported in zip(self.plans, exports):
            for offset, unit in enumerate(plan.units):
                prefix = f"{offset}."
                unit_state = {
                    k[len(prefix) :]: v for k, v in exported["body"].items() if k.startswith(prefix)
                }
                network[unit].load_state_dict(unit_state)
            if plan.is_last:
                network[-1].load_state_dict(exported["head"])
        return network

    def close(self) -> None:
        """Tear the transport down (a compiled graph's loops stop); the workers stay alive.
        Called before they are killed, and by the driver itself when a call fails."""
        self.transport.close()
        self.inflight.clear()  # after: a dropped call on a live graph waits for its result

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        return {name: list(spans) for name, spans in self.spans.items()}

    def peak_training_bytes(self) -> dict[str, int]:
        values = ray.get([w.peak_training_bytes.remote() for w in self.workers])
        return {f"block-{k}": v for k, v in enumerate(values) if v is not None}
