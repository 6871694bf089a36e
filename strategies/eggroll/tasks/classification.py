"""Supervised classification with no gradients: fitness is minus a batch's loss."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.data.source import DatasetInfo
from orchestrator.data.stream import BatchStream
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig
from strategies.eggroll.lowrank import ESLinear
from strategies.eggroll.tasks.common import member_nll, model_device, seeded
from strategies.eggroll.tasks.configs import ClassificationTaskConfig
from strategies.models.mlp import layer_widths

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class ClassificationTask:
    """The run's MLP on the run's data; fitness is minus the loss on generation t's batch."""

    def __init__(
        self, config: ClassificationTaskConfig, model: ModelConfig, dataset: DatasetInfo
    ) -> None:
        if model.norm == "batchnorm":
            raise ConfigError(
                "model.norm: 'batchnorm' is not allowed with eggroll, whose members share a "
                "batch; use 'layernorm' or 'none'"
            )
        if model.dropout > 0:
            raise ConfigError(
                f"model.dropout: {model.dropout} is not allowed with eggroll, which scores "
                "deterministic members; set it to 0"
            )
        self.config = config
        self.model_config = model
        self.dataset = dataset
        self._stream: BatchStream | None = None
        self._stream_seed: int | None = None

    def build_model(self, seed: int) -> nn.Module:
        """ESLinear layers; layernorm without a gain or bias, as plain LayerNorm params
        would take noise that its forward never applies."""
        widths = layer_widths(self.model_config, self.dataset.num_features)
        layers: list[nn.Module] = []
        with seeded(seed):
            for fan_in, fan_out in itertools.pairwise(widths):
                layers.append(ESLinear(fan_in, fan_out))
                if self.model_config.norm == "layernorm":
                    layers.append(nn.LayerNorm(fan_out, elementwise_affine=False))
                layers.append(_ACTIVATIONS[self.model_config.activation]())
            layers.append(ESLinear(widths[-1], self.dataset.num_classes))
        return nn.Sequential(*layers)

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
        loss, correct, rows = 0.0, 0, 0
        for x, y in itertools.islice(stream, self.config.eval_batches):
            logits = model(x.to(device))
            target = y.to(device)
            loss += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(-1) == target).sum())
            rows += len(y)
        return {"eval/accuracy": correct / max(rows, 1), "eval/loss": loss / max(rows, 1)}
