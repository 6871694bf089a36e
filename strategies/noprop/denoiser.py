"""One NoProp-DT block: its network û_θt(z_{t-1}, x) and its local training step.

The network follows the paper's DT block as a course report restates it (DanielHalachev/
NoProp, ``docs/latex/NoProp.tex`` §2.4; the paper itself could not be read): an x branch
(for images: conv 32-64-128, 3x3, each with ReLU, 2x2 max-pooling and dropout, then flatten,
FC and batch norm), a z branch (FC + BN + ReLU twice, with a skip), and fused FC + BN + ReLU
layers to C logits; û = softmax(logits) · W_Embed, a point in the hull of the class
embeddings. For table data the x branch is an MLP of ``model.hidden``'s widths with ReLU
(the model section's norm, activation and dropout are not read): this project's extension,
not the paper's.

Plain torch, no Ray: ``workers.denoiser`` is the actor that holds one ``DenoisingBlock``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config import EngineConfig
from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import MLPConfig
from strategies.engines.base import build_engine
from strategies.noprop import diffusion
from strategies.optim import build_optimizer

if TYPE_CHECKING:
    from strategies.noprop.config import NoPropConfig

CONV_CHANNELS = (32, 64, 128)


def _image_branch(shape: tuple[int, ...], width: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels, height, side = shape[0], shape[1], shape[2]
    for out in CONV_CHANNELS:
        layers += [
            nn.Conv2d(channels, out, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(dropout),
        ]
        channels, height, side = out, height // 2, side // 2
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(channels * height * side, width), nn.BatchNorm1d(width)
    )


def _table_branch(features: int, hidden: list[int], width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for units in hidden:
        layers += [nn.Linear(features, units), nn.ReLU()]
        features = units
    return nn.Sequential(*layers, nn.Linear(features, width), nn.BatchNorm1d(width))


def _dense(inputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.BatchNorm1d(width), nn.ReLU())


class Denoiser(nn.Module):
    """û_θt's logits over the classes from an example x and a noisy embedding z_{t-1}."""

    def __init__(
        self, input: InputSpec, hidden: list[int], embedding_dim: int, width: int, dropout: float
    ) -> None:
        super().__init__()
        if input.kind == "image":
            self.x_branch = _image_branch(input.shape, width, dropout)
        else:
            self.x_branch = _table_branch(input.shape[0], hidden, width)
        self.z_in = _dense(embedding_dim, width)
        self.z_skip = _dense(width, width)
        self.fused = nn.Sequential(
            _dense(2 * width, width), _dense(width, width), nn.Linear(width, input.num_classes)
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        fz = self.z_in(z)
        fz = fz + self.z_skip(fz)
        return self.fused(torch.cat([self.x_branch(x), fz], dim=1))


def initial_embedding(kind: str, classes: int, dim: int, seed: int) -> torch.Tensor:
    """W_Embed (C x d), the same on every block: the identity for ``onehot``; for ``learned``
    Gaussian rows of unit expected norm (this project's choice), drawn from the run seed."""
    if kind == "onehot":
        return torch.eye(classes)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(classes, dim, generator=generator) / dim**0.5


@dataclass(frozen=True)
class DenoiserSpec:
    """What a worker needs to build block ``t`` (1..T)."""

    t: int
    config: NoPropConfig
    model: MLPConfig
    input: InputSpec
    seed: int
    device: str = "cpu"
    engine: EngineConfig | None = None
    skip_nonfinite: bool = False

    @property
    def is_last(self) -> bool:
        """Block T also holds the classifier p̂(y | z_T) and trains a learned embedding."""
        return self.t == self.config.blocks


@dataclass
class BlockStats:
    """One batch's figures, left as tensors until a call reads them out."""

    denoise: torch.Tensor
    """The weighted term of Eq. 8."""
    mse: torch.Tensor
    """‖û - u_y‖², unweighted (comparable across blocks)."""
    head: torch.Tensor
    """CE + KL of Eq. 8 (block T), 0 elsewhere."""
    correct: torch.Tensor
    """Classifier hits on z_T ~ q(z_T | y) (block T)."""


class NoPropBlock(nn.Module):
    """Block t's denoiser and, on block T, the classifier and a learned embedding."""

    def __init__(self, spec: DenoiserSpec) -> None:
        super().__init__()
        config, classes = spec.config, spec.input.num_classes
        dim = config.embedding_size(classes)
        torch.manual_seed(spec.seed * 1_000 + spec.t)  # each block its own initial weights
        self.denoiser = Denoiser(spec.input, spec.model.hidden, dim, config.width, config.dropout)
        embedding = initial_embedding(config.embedding, classes, dim, spec.seed)
        if config.embedding == "learned" and spec.is_last:
            self.embedding = nn.Parameter(embedding)
        else:
            self.register_buffer("embedding", embedding)
        self.classifier = nn.Linear(dim, classes) if spec.is_last else None

    def predict(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """û_θt(z_{t-1}, x) = softmax(logits) · W_Embed."""
        return F.softmax(self.denoiser(x, z), dim=1) @ self.embedding


class DenoisingBlock:
    """Block t trained on its own: samples z_{t-1} ~ q(z_{t-1} | y) for its batch, and
    minimises its term of Eq. 8 (plus, on block T, the classifier's CE and the KL)."""

    def __init__(self, spec: DenoiserSpec) -> None:
        config = spec.config
        self.spec = spec
        self.net = NoPropBlock(spec).to(spec.device)
        self.alpha_bar = diffusion.cosine_alpha_bar(config.blocks)
        self.weight = float(diffusion.denoising_weights(self.alpha_bar, config.eta)[spec.t - 1])
        self.coefficients = diffusion.posterior_coefficients(self.alpha_bar)
        self.engine = build_engine(
            spec.engine or EngineConfig(),
            [self.net],
            build_optimizer(self.net.parameters(), config.optimizer),
            spec.device,
            spec.skip_nonfinite,
        )
        self.optimizer = self.engine.optimizer

    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, BlockStats]:
        """This block's objective on one batch, and its figures."""
        t, net = self.spec.t, self.net
        u = net.embedding[y]
        # A learned W_Embed learns from the target u_y and the classifier's term, not through
        # the noisy input (our choice: the paper's gradient path through q is not known).
        z_prev = diffusion.sample_q(u.detach(), float(self.alpha_bar[t - 1]))
        u_hat = net.predict(x, z_prev)
        mse = (u_hat - u).pow(2).sum(dim=1).mean()
        denoise = self.weight * mse
        head = torch.zeros((), device=x.device)
        correct = torch.zeros((), dtype=torch.long, device=x.device)
        if net.classifier is not None:
            ce, correct = diffusion.classifier_loss(net.classifier, u, y, float(self.alpha_bar[-1]))
            head = ce + diffusion.kl_to_prior(u, float(self.alpha_bar[0]))
        stats = BlockStats(denoise.detach(), mse.detach(), head.detach(), correct)
        return denoise + head, stats

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> BlockStats:
        self.net.train()
        with self.engine.autocast():
            loss, stats = self.loss(x, y)
        self.engine.update(loss)
        return stats

    @torch.no_grad()
    def denoise(
        self, x: torch.Tensor, z_prev: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Inference step t: z_t from z_{t-1} (Eq. 3), noise drawn from ``generator``."""
        self.net.eval()
        noise = torch.randn(z_prev.shape, generator=generator).to(z_prev.device)
        u_hat = self.net.predict(x, z_prev)
        return diffusion.posterior_step(u_hat, z_prev, self.spec.t, self.coefficients, noise)

    @torch.no_grad()
    def classify(self, z_T: torch.Tensor) -> torch.Tensor:
        """p̂(y | z_T)'s logits (block T only)."""
        assert self.net.classifier is not None, "only block T holds the classifier"
        return self.net.classifier(z_T)

    def set_embedding(self, embedding: torch.Tensor) -> None:
        """Take the learned embedding that block T trains (the driver sends it)."""
        self.net.embedding.data.copy_(embedding)

    def state(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.engine.state()}

    def restore(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.engine.load(state["optimizer"])


def check_denoiser(config: NoPropConfig, model: MLPConfig, input: InputSpec) -> None:
    """Run one block on two zero examples: an image smaller than 8x8 (three 2x2 poolings)
    is refused with the fix, not found out inside a worker."""
    if input.kind == "image" and min(input.shape[1:]) < 2 ** len(CONV_CHANNELS):
        raise ConfigError(
            f"data: strategy 'noprop' runs the paper's CNN (three 2x2 poolings), which needs "
            f"images of at least 8x8 pixels, but they are {input.shape[1]}x{input.shape[2]}; "
            "use larger images"
        )
    dim = config.embedding_size(input.num_classes)
    net = Denoiser(input, model.hidden, dim, config.width, config.dropout).eval()
    with torch.no_grad():
        net(torch.zeros(2, *input.shape), torch.zeros(2, dim))
