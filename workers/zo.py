"""ZOWorker: one replica of the network, scoring its slice of every batch for SPSA.

Thin shell around ``strategies.zo.spsa``: it regenerates the update's directions from
their keys, returns the summed losses of its rows at theta +- eps z, and applies the same
update as every other replica from the projected gradients alone. No weights cross the
network except when the controller resyncs a replica that drifted.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch
from torch.func import functional_call

from orchestrator.data.source import DatasetInfo
from orchestrator.data.stream import BatchStream
from strategies.config import ModelConfig
from strategies.models.loss import TaskLoss, task_loss, with_bits
from strategies.models.network import build_network
from strategies.replicas import parameter_checksum, single_thread
from strategies.zo.spsa import (
    Direction,
    SeededDirection,
    decayed,
    drift_,
    in_place_pair,
    optimised_parameters,
    perturbed,
    spsa_update_,
)
from workers.host import on_host
from workers.telemetry import BusyTimeline, StepMemory


class ZOReplica:
    """Network, data and SPSA settings: what the controller and each worker hold identically.

    Built on the CPU from the seed, then moved: every replica starts from the same bytes
    whatever its device. In eval mode for good: both perturbations see one deterministic
    function (no dropout), as MeZO's ``zo_forward``.
    """

    def __init__(
        self,
        model: ModelConfig,
        dataset: DatasetInfo,
        batch_size: int,
        seed: int,
        directions: int,
        weight_decay: float,
        in_place: bool,
        eval_batches: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.model = build_network(model, dataset.input, seed).to(device).eval()
        named = optimised_parameters(self.model)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        for p in self.params:
            p.requires_grad_(False)  # no autograd anywhere: memory stays inference's
        decays = decayed(self.model)
        self.decays = [decays[name] for name in self.names]
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.directions, self.weight_decay, self.in_place = directions, weight_decay, in_place
        self.eval_batches, self.device = eval_batches, device
        self._stream: BatchStream | None = None

    def _directions(self, update: int, which: range | list[int]) -> list[Direction]:
        return [SeededDirection(self.seed, update, k) for k in which]

    def _rows(self, update: int, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``first .. last - 1`` of train batch ``update`` (every replica reads the
        same batch and keeps its slice; sequential batches are cheap to keep streaming)."""
        if self._stream is None:
            self._stream = BatchStream(self.dataset, "train", self.batch_size, self.seed)
        x, y = self._stream.batch(update)
        return x[first:last].to(self.device), y[first:last].to(self.device)

    def _scored(
        self, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor] | None = None
    ) -> TaskLoss:
        """The summed loss of (x, y) with the live weights, or with ``params`` in their place."""
        logits = (
            self.model(x)
            if params is None
            else functional_call(self.model, dict(zip(self.names, params, strict=True)), (x,))
        )
        return task_loss(logits, y, reduction="sum")

    @torch.inference_mode()
    def losses(self, update: int, first: int, last: int, eps: float) -> tuple[np.ndarray, int]:
        """Summed losses of rows ``first .. last - 1`` at theta + eps z_k and theta - eps z_k
        ([directions, 2]), and how many predictions they sum: the driver divides the sums
        of all slices by the count of all, so any split gives the whole batch's mean."""
        x, y = self._rows(update, first, last)
        sums, count = np.zeros((self.directions, 2)), 0
        with single_thread():  # z drawn and added as on every other replica
            for k, direction in enumerate(self._directions(update, range(self.directions))):
                if self.in_place:
                    for side, _ in enumerate(in_place_pair(self.params, direction, eps)):
                        scored = self._scored(x, y)
                        sums[k, side], count = float(scored.loss), scored.count
                else:
                    for side, scale in enumerate((eps, -eps)):
                        scored = self._scored(x, y, perturbed(self.params, direction, scale))
                        sums[k, side], count = float(scored.loss), scored.count
        return sums, count

    def update(self, update: int, grads: dict[int, float], lr: float) -> float:
        """The step of update ``update`` from the kept directions' projected gradients
        (direction number: g_k); returns its norm."""
        with single_thread(), torch.no_grad():
            return spsa_update_(
                self.params,
                self.decays,
                self._directions(update, sorted(grads)),
                [grads[k] for k in sorted(grads)],
                lr,
                self.weight_decay,
            )

    def drift(self, update: int, eps: float) -> None:
        """The in-place round trips of ``losses`` without scoring: the driver's reference
        replica rounds as the scoring ones did (``in_place``)."""
        with single_thread():
            drift_(self.params, self._directions(update, range(self.directions)), eps)

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        stream = BatchStream(self.dataset, "test", self.batch_size, self.seed)
        loss, hits, count = 0.0, 0, 0
        for x, y in itertools.islice(stream, self.eval_batches):
            scored = task_loss(self.model(x.to(self.device)), y.to(self.device), reduction="sum")
            loss += float(scored.loss)
            hits += int(scored.hits)
            count += scored.count
        metrics = {"eval/loss": loss / max(count, 1), "eval/accuracy": hits / max(count, 1)}
        return with_bits(metrics, self.dataset.input, "eval")

    def checksum(self) -> str:
        return parameter_checksum(self.params)

    def state(self) -> dict:
        """On the CPU, so a checkpoint or a resync loads wherever the reader runs."""
        return on_host({"model": self.model.state_dict()})

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])


class ZOWorker:
    def __init__(self, threads: int, device: str = "cpu", **replica: object) -> None:
        torch.set_num_threads(threads)
        self.replica = ZOReplica(**replica, device=device)  # type: ignore[arg-type]
        self.timeline = BusyTimeline()
        self.memory = StepMemory(device)

    def pid(self) -> int:
        return os.getpid()

    def losses(self, update: int, first: int, last: int, eps: float) -> tuple[np.ndarray, int]:
        with self.timeline.busy(), self.memory.inference():
            return self.replica.losses(update, first, last, eps)

    def update(self, update: int, grads: dict[int, float], lr: float) -> None:
        with self.timeline.busy(), self.memory.inference():
            self.replica.update(update, grads, lr)
        # No gradient and no optimizer state: what lives across the step is the weights.
        self.memory.finish(held=self.replica.params)

    def spans(self) -> list[tuple[float, float]]:
        return list(self.timeline.spans)

    def evaluate(self) -> dict[str, float]:
        return self.replica.evaluate()

    def checksum(self) -> str:
        return self.replica.checksum()

    def load(self, state: dict) -> None:
        self.replica.load(state)

    def peak_training_bytes(self) -> int | None:
        return self.memory.peak
