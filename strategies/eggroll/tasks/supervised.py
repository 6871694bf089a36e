"""The run's network on the run's data with no gradients: fitness is minus a batch's loss.

Any model family whose layers EGGROLL perturbs (``convert.es_network``): a class per
example of tables or images (``kind: classification``), or the next token at every
position of text windows (``kind: lm``). Every member of generation t scores train batch
t, so the members of a generation differ only in their perturbations.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from orchestrator.data.source import DatasetInfo
from orchestrator.data.stream import BatchStream
from orchestrator.errors import ConfigError
from strategies.config import ModelFamilyConfig
from strategies.eggroll.config import task_data_mismatch
from strategies.eggroll.convert import check_population_forward, es_network
from strategies.eggroll.tasks.common import member_nll, model_device
from strategies.eggroll.tasks.configs import DataTaskConfig
from strategies.models.loss import task_loss, with_bits
from strategies.models.network import build_network


class SupervisedTask:
    """Fitness: minus the mean cross-entropy of train batch t (per example, or per token
    for a language model); evaluation: held-out loss and accuracy, and bits per token for
    a language model."""

    def __init__(
        self, config: DataTaskConfig, model: ModelFamilyConfig, dataset: DatasetInfo
    ) -> None:
        mismatch = task_data_mismatch(config.kind, dataset.input.kind)
        if mismatch is not None:
            raise ConfigError(mismatch)
        self.config = config
        self.model_config = model
        self.dataset = dataset
        self._stream: BatchStream | None = None
        self._stream_seed: int | None = None

    def build_model(self, seed: int) -> nn.Module:
        """``build_network``'s network from ``seed``, its layers swapped for ES layers, in
        eval mode: members are scored deterministically, so dropout stays off."""
        network = es_network(build_network(self.model_config, self.dataset.input, seed)).eval()
        check_population_forward(network, self.dataset.input)
        return network

    def _train_batch(self, generation: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train batch ``generation``; the stream is kept, as sequential batches are cheap."""
        if self._stream is None or self._stream_seed != seed:
            self._stream = BatchStream(self.dataset, "train", self.config.batch_size, seed)
            self._stream_seed = seed
        return self._stream.batch(generation)

    @torch.no_grad()
    def fitness(self, model: nn.Module, k: int, generation: int, seed: int) -> torch.Tensor:
        x, y = self._train_batch(generation, seed)
        device = model_device(model)
        logits = model(x.to(device).expand(k, *x.shape))
        return -member_nll(logits, y.to(device)).float().cpu()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        stream = BatchStream(self.dataset, "test", self.config.batch_size, seed)
        device = model_device(model)
        loss, hits, count = 0.0, 0, 0
        for x, y in itertools.islice(stream, self.config.eval_batches):
            scored = task_loss(model(x.to(device)), y.to(device), reduction="sum")
            loss += scored.loss.item()
            hits += int(scored.hits)
            count += scored.count
        metrics = {"eval/accuracy": hits / max(count, 1), "eval/loss": loss / max(count, 1)}
        return with_bits(metrics, self.dataset.input, "eval")
