"""Any family's network as EGGROLL runs it: the same function outside a population, each
member its own perturbed network inside one, and a clear refusal of what it cannot perturb."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from orchestrator.config import validate_mapping
from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig
from strategies.eggroll.convert import check_population_forward, es_network
from strategies.eggroll.lowrank import (
    ESEmbedding,
    ESLayerNorm,
    ESLinear,
    NoiseSpec,
    es_parameters,
    member_noise,
    population,
)
from strategies.models.network import build_network
from strategies.models.units import example_batch

TOKENS = InputSpec("tokens", (12,), 20)
TABLE = InputSpec("table", (8,), 4)
IMAGES = InputSpec("image", (1, 8, 8), 10)
TRANSFORMER = {"kind": "transformer", "d_model": 16, "layers": 2, "heads": 2}


def flat_image_mlp(spec: InputSpec) -> list[nn.Module]:
    """A custom network EGGROLL can train on images: it flattens from the end."""
    return [
        nn.Sequential(nn.Flatten(-3), nn.Linear(64, 16), nn.LayerNorm(16), nn.GELU()),
        nn.Sequential(nn.Dropout(0.5), nn.LayerNorm(16, elementwise_affine=False)),
        nn.Linear(16, spec.num_classes, bias=False),
    ]


NETWORKS = {
    "mlp": (ModelConfig(hidden=[16, 16]), TABLE),
    "transformer": (ModelConfig(**TRANSFORMER), TOKENS),
    "tied-transformer": (ModelConfig(**TRANSFORMER, tie_embeddings=True), TOKENS),
    "custom": (ModelConfig(kind="custom", module=flat_image_mlp), IMAGES),
}


def network_and_input(name: str) -> tuple[nn.Sequential, torch.Tensor, InputSpec]:
    model, spec = NETWORKS[name]
    network = build_network(model, spec, seed=0).eval()
    x = example_batch(spec, batch=3)
    if spec.kind == "tokens":
        x = torch.randint(0, spec.num_classes, x.shape, generator=torch.Generator().manual_seed(1))
    return network, x, spec


@pytest.mark.parametrize("name", list(NETWORKS))
def test_conversion_keeps_the_weights_and_the_outputs(name: str):
    network, x, _ = network_and_input(name)
    converted = es_network(network)
    assert torch.equal(converted(x), network(x))
    assert [n for n, _ in converted.named_parameters()] == [
        n for n, _ in network.named_parameters()
    ]
    kinds = {type(m) for m in converted.modules()}
    assert nn.Linear not in kinds and nn.Embedding not in kinds
    assert ESLinear in kinds and ESLayerNorm in kinds
    assert (ESEmbedding in kinds) == ("transformer" in name)
    assert any(type(m) is nn.Linear for m in network.modules())  # the original is untouched


def test_a_tied_embedding_stays_one_parameter_perturbed_as_one():
    network, _, _ = network_and_input("tied-transformer")
    converted = es_network(network)
    assert converted[-1][1].weight is converted[0][0].tokens.weight
    assert len(es_parameters(converted)) == len(es_parameters(network))


@pytest.mark.parametrize("name", list(NETWORKS))
def test_zero_noise_members_all_compute_the_plain_forward(name: str):
    network, x, spec = network_and_input(name)
    converted = es_network(network)
    noise = member_noise(es_parameters(converted), range(4), 0, 0, 0.0, NoiseSpec(rank=2))
    with torch.no_grad(), population(converted, noise):
        members = converted(x.expand(4, *x.shape))
    assert members.shape == (4, *network(x).shape)
    for member in members:
        torch.testing.assert_close(member, network(x), rtol=1e-5, atol=1e-5)
    check_population_forward(converted, spec)


@pytest.mark.parametrize("name", ["transformer", "tied-transformer", "custom"])
def test_each_member_computes_the_network_with_its_own_perturbed_weights(name: str):
    network, x, _ = network_and_input(name)
    converted = es_network(network)
    noise = member_noise(es_parameters(converted), range(3), 5, 2, 0.05, NoiseSpec(rank=2))
    with torch.no_grad(), population(converted, noise):
        members = converted(x.expand(3, *x.shape))
    for i in range(3):
        explicit = copy.deepcopy(network)
        with torch.no_grad():
            for param, n in zip(es_parameters(explicit), noise, strict=True):
                param.add_(n.dense()[i])
            torch.testing.assert_close(members[i], explicit(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(members[0], members[1])


class LearnedPositions(nn.Module):
    """A raw nn.Parameter used directly: EGGROLL has no population forward for it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(12, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    ("units", "match"),
    [
        (
            [nn.Sequential(nn.Embedding(20, 16), LearnedPositions()), nn.Linear(16, 20)],
            r"unit 0's module '0\.1' \(LearnedPositions, parameters table\)",
        ),
        (
            [nn.Sequential(nn.Embedding(20, 16), nn.GRU(16, 16)), nn.Linear(16, 20)],
            r"unit 0's module '0\.1' \(GRU, parameters weight_ih_l0.*recurrent",
        ),
        (
            [nn.Sequential(nn.Embedding(20, 16)), nn.BatchNorm1d(16, affine=False)],
            r"the output layer's module '1' \(BatchNorm1d, batch statistics\)",
        ),
        (
            [nn.Embedding(20, 16, max_norm=1.0), nn.Linear(16, 20)],
            r"unit 0's module '0' \(Embedding.*max_norm=None",
        ),
        (
            [nn.Embedding(20, 16), ScaledLinear(16, 20)],
            r"module '1' \(ScaledLinear.*a subclass",
        ),
    ],
)
def test_a_layer_eggroll_cannot_perturb_is_refused_by_its_path(units, match):
    with pytest.raises(ConfigError, match=match) as refused:
        es_network(nn.Sequential(*units))
    assert "EGGROLL perturbs nn.Linear and nn.Embedding" in str(refused.value)
    assert "strategy.kind: backprop or pipeline" in str(refused.value)


def test_a_resnet_is_refused_at_its_first_convolution():
    resnet = build_network(ModelConfig(kind="resnet", depth=8, width=4), IMAGES, seed=0)
    with pytest.raises(ConfigError, match=r"unit 0's module '0\.0\.0' \(Conv2d.*convolutions"):
        es_network(resnet)


def test_a_unit_that_flattens_the_member_dim_is_named():
    def flattens_from_the_front(spec: InputSpec) -> list[nn.Module]:
        return [nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), nn.Linear(16, spec.num_classes)]

    model = ModelConfig(kind="custom", module=flattens_from_the_front)
    converted = es_network(build_network(model, IMAGES, seed=0))
    with pytest.raises(ConfigError, match=r"unit 0 \(Sequential\) does not take eggroll's"):
        check_population_forward(converted, IMAGES)


def eggroll_run(model: dict, data: dict, task: str = "classification") -> dict:
    return {"strategy": {"kind": "eggroll", "task": {"kind": task}}, "model": model, "data": data}


@pytest.mark.parametrize(
    ("model", "data", "task", "match"),
    [
        ({"kind": "resnet", "depth": 8}, {"dataset": "digits-images"}, "classification",
         r"model.kind: 'resnet' cannot be trained by eggroll: its convolutions and batch norm"),
        ({"norm": "batchnorm"}, {"dataset": "digits"}, "classification",
         r"model.norm: 'batchnorm' is not allowed with eggroll"),
        ({**TRANSFORMER, "dropout": 0.1}, {"dataset": "grammar"}, "lm", r"model.dropout: 0.1"),
        (TRANSFORMER, {"dataset": "grammar"}, "classification", r"set strategy.task.kind: lm"),
        ({"hidden": [8]}, {"dataset": "digits"}, "lm", r"lm predicts next tokens.*classification"),
        (TRANSFORMER, {"dataset": "digits"}, "classification", r"'transformer' takes tokens"),
    ],
)  # fmt: skip
def test_what_eggroll_cannot_train_is_refused_when_the_config_is_loaded(model, data, task, match):
    with pytest.raises(ConfigError, match=match):
        validate_mapping(eggroll_run(model, data, task))


def test_a_transformer_language_model_config_is_accepted():
    config = validate_mapping(eggroll_run(TRANSFORMER, {"dataset": "grammar"}, "lm"))
    assert config.strategy.task.kind == "lm"
