"""Strategies registered by name: `strategy.kind` in a config picks one.

Built-in strategies are imported on first use so that importing a strategy's math
(e.g. from a worker) never pulls in every other strategy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from strategies.base import Strategy

# PBT comes last: its trials may be any strategy registered before it.
BUILTIN_MODULES = (
    "strategies.backprop",
    "strategies.eggroll_strategy",
    "strategies.moe_hc_strategy",
    "strategies.pipeline",
    "strategies.pbt",
)

_REGISTRY: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound="type[Strategy]")


def register(kind: str):  # noqa: ANN201 - a decorator keeps the class's own type
    """Class decorator: make a strategy available as ``strategy.kind: <kind>``."""

    def decorate(cls: S) -> S:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"strategy kind {kind!r} is registered twice")
        _REGISTRY[kind] = cls
        return cls

    return decorate


def strategy_registry() -> dict[str, type[Strategy]]:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))
