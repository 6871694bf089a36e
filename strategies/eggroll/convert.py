"""Any family's network as EGGROLL evaluates it: ``build_network``'s layers swapped for the
ES layers that apply a population's noise in their forward.

EGGROLL perturbs exactly three layer types, as the paper's reference code does
(``MM``, ``EMB`` and ``Parameter`` in its ``models/common.py``): ``nn.Linear`` and
``nn.Embedding`` take rank-r noise ``A B^T`` on their matrix and dense noise on a bias
(``ESLinear``, ``ESEmbedding``), ``nn.LayerNorm``'s gain and bias take dense noise
(``ESLayerNorm``). Every other module that holds parameters (a convolution, batch norm,
a GRU, a raw ``nn.Parameter`` such as a learned position table) is refused by its path:
there is no population forward for it, and leaving it unperturbed would train a different
network than the config names. Batch norm is refused even without parameters: its
statistics mix the examples, and in a population the members.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.eggroll.config import PERTURBED
from strategies.eggroll.lowrank import (
    ES_LAYERS,
    ESEmbedding,
    ESLayerNorm,
    ESLinear,
    NoiseSpec,
    es_parameters,
    member_noise,
    population,
)
from strategies.models.units import example_batch

_FIX = (
    "build the network from those layers and parameter-free ones (activations, dropout, "
    "reshapes, attention arithmetic), or train it with strategy.kind: backprop or pipeline"
)
_HINTS = {
    nn.modules.conv._ConvNd: "convolutions are not perturbed",
    nn.modules.batchnorm._NormBase: "batch and instance norm mix the examples of a batch "
    "(nn.LayerNorm normalises each example alone)",
    nn.RNNBase: "a recurrent layer's fused weights are not perturbed (a cell written with "
    "nn.Linear gates is, as the char_lm task's GRU)",
}


def _as_es(module: nn.Module) -> nn.Module | None:
    """The ES twin of a layer EGGROLL perturbs, holding the same parameter objects (so a
    tied weight stays one parameter), or None for any other module. Exact types only: a
    subclass may compute something else in its forward."""
    kind = type(module)
    with torch.device("meta"):  # the twin's own initial weights are thrown away
        if kind is nn.Linear:
            twin: nn.Module = ESLinear(module.in_features, module.out_features)
        elif kind is nn.Embedding and module.max_norm is None:
            twin = ESEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx)
        elif kind is nn.LayerNorm and module.elementwise_affine:
            twin = ESLayerNorm(module.normalized_shape, module.eps)
        else:
            return None
    for name, param in module.named_parameters(recurse=False):
        setattr(twin, name, param)
    for name in {"bias"} - dict(module.named_parameters(recurse=False)).keys():
        setattr(twin, name, None)  # nn.Linear(bias=False), nn.LayerNorm(bias=False)
    return twin.train(module.training)


def _refusal(path: str, module: nn.Module) -> ConfigError:
    own = [name for name, _ in module.named_parameters(recurse=False)]
    holds = f"parameters {', '.join(own)}" if own else "batch statistics"
    hint = next((why for base, why in _HINTS.items() if isinstance(module, base)), None)
    if type(module) is nn.Embedding:
        hint = "its max_norm renormalises the table in place; set max_norm=None"
    elif isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
        hint = "a subclass, whose forward eggroll cannot know; use the layer itself"
    return ConfigError(
        f"model: eggroll cannot perturb {path} ({type(module).__name__}, {holds})"
        f"{f'; {hint}' if hint else ''}. EGGROLL perturbs {PERTURBED}; {_FIX}"
    )


def _where(path: str, count: int) -> str:
    unit = int(path.split(".", 1)[0])
    what = "the output layer" if unit == count - 1 else f"unit {unit}"
    return f"{what}'s module {path!r}"


def es_network(network: nn.Sequential) -> nn.Sequential:
    """A copy of ``network`` whose perturbed layers are ES layers with the same weights
    (outside ``population`` it computes exactly what ``network`` does); ConfigError naming
    the first module EGGROLL cannot perturb."""
    converted = copy.deepcopy(network)  # the copy keeps tied parameters tied
    _swap_children(converted, "", len(converted))
    return converted


def _swap_children(module: nn.Module, prefix: str, count: int) -> None:
    """Depth first: a perturbed layer is swapped whole, anything else is checked and
    searched."""
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, ES_LAYERS):
            continue
        twin = _as_es(child)
        if twin is not None:
            setattr(module, name, twin)
            continue
        holds_params = next(child.parameters(recurse=False), None) is not None
        if holds_params or isinstance(child, nn.modules.batchnorm._NormBase):
            raise _refusal(_where(path, count), child)
        _swap_children(child, path + ".", count)


def check_population_forward(network: nn.Sequential, spec: InputSpec, members: int = 2) -> None:
    """Run each unit on a leading member dim with zero noise: every member must get what
    the plain unit gives. ConfigError naming the first unit that drops or misreads that
    dim (a custom ``nn.Flatten()`` flattens it into the features, say)."""
    plain = example_batch(spec)
    crowd = plain.expand(members, *plain.shape)
    for index, unit in enumerate(network):
        what = "the output layer" if index == len(network) - 1 else f"unit {index}"
        noise = member_noise(es_parameters(unit), range(members), 0, 0, 0.0, NoiseSpec())
        with torch.no_grad():
            plain = unit(plain)
            try:
                with population(unit, noise):
                    crowd = unit(crowd)
            except Exception as err:  # a user's module can raise anything: name it
                raise _member_dim_error(what, unit, f"{type(err).__name__}: {err}") from err
        if crowd.shape != (members, *plain.shape) or not torch.allclose(
            crowd, plain.expand_as(crowd), rtol=1e-4, atol=1e-5
        ):
            got = tuple(crowd.shape)
            raise _member_dim_error(
                what, unit, f"gives {got}, not {members} x {tuple(plain.shape)}"
            )


def _member_dim_error(what: str, unit: nn.Module, why: str) -> ConfigError:
    return ConfigError(
        f"model: {what} ({type(unit).__name__}) does not take eggroll's leading member dim "
        f"(inputs [members, batch, ...]): {why}. Index dims from the end (x.flatten(-3), "
        "x.shape[-1], dim=-1) so that any leading dims pass through"
    )
