"""The model families by ``model.kind``: how each builds its units and rebuilds them for an
AugLocal aux net (a small spec per family, as torchtitan's ``TrainSpec``, rather than
``if kind == ...`` chains in the strategies)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig, ModelFamilyConfig
from strategies.models import custom, mlp, resnet, transformer
from strategies.models.units import Shape


@dataclass(frozen=True)
class Family:
    build: Callable[[Any, InputSpec], list[nn.Module]]
    """The units, then the output layer."""
    rebuild_units: Callable[
        [Any, InputSpec, Sequence[int], Shape, Sequence[Shape]], list[nn.Module]
    ]
    """``(model, spec, chosen, shape, shapes)``: fresh modules shaped like units ``chosen``
    (whose outputs in the network are ``shapes[j]``), the first taking ``shape``."""


FAMILIES: dict[str, Family] = {
    "mlp": Family(mlp.build, mlp.rebuild_units),
    "resnet": Family(resnet.build, resnet.rebuild_units),
    "transformer": Family(transformer.build, transformer.rebuild_units),
    "custom": Family(custom.build, custom.rebuild_units),
}


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from ``seed`` alone, and leave the process RNG as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def check_input(model: ModelFamilyConfig, spec: InputSpec) -> None:
    """A family that cannot read the data's examples is refused before anything is built."""
    why = model.unreadable(spec.kind)
    if why is not None:
        raise ConfigError(f"{why} (examples of shape {spec.shape})")


def build_network(model: ModelConfig, spec: InputSpec, seed: int) -> nn.Sequential:
    """The units then the output layer, initialised from ``seed`` alone: the pipeline
    slices the units into blocks and gives the last block ``network[-1]`` as its head."""
    check_input(model, spec)
    with seeded(seed):
        return nn.Sequential(*FAMILIES[model.kind].build(model, spec))
