"""Strategies registered by kind: `strategy.kind` in a config picks one.

Built-in strategies are the folders of this package: each ``strategies/<kind>/config.py``
registers its config section with ``@register("module:Driver")``. Strategies from other
packages register the same way and are announced through the ``unlocked.strategies``
entry-point group (name: the kind; value: ``package.module:TheirConfig``).

Only configs are imported to validate a run; a strategy's driver (with its Ray, torch and
worker imports) is imported by ``strategy_class`` when a run starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import SerializeAsAny, ValidationInfo, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from orchestrator.errors import UserError
from strategies.config import StrategyConfig

if TYPE_CHECKING:
    from strategies.base import Strategy

ENTRY_POINT_GROUP = "unlocked.strategies"

_CONFIGS: dict[str, type[StrategyConfig]] = {}
_discovered = False
C = TypeVar("C", bound=type[StrategyConfig])


def register(driver: str) -> Callable[[C], C]:
    """Class decorator on a strategy's config section: its ``kind`` becomes a
    ``strategy.kind``, trained by the Strategy class at ``driver`` (``module:Class``)."""

    def decorate(cls: C) -> C:
        kind = cls.model_fields["kind"].default
        if not isinstance(kind, str):
            raise TypeError(f"{cls.__name__}.kind needs a string default (its Literal kind)")
        if kind in _CONFIGS and _CONFIGS[kind] is not cls:
            raise ValueError(f"strategy kind {kind!r} is registered twice")
        cls.driver = driver
        _CONFIGS[kind] = cls
        return cls

    return decorate


def _discover() -> None:
    """Import every built-in strategy's config, then every outside one's (once)."""
    global _discovered
    if _discovered:
        return
    import strategies

    for module in pkgutil.iter_modules(strategies.__path__):
        if module.ispkg and importlib.util.find_spec(f"strategies.{module.name}.config"):
            importlib.import_module(f"strategies.{module.name}.config")
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = point.load()
        except Exception as err:  # an outside package's bug: name it, not ours
            raise UserError(
                f"strategy {point.name!r} (entry point {point.value!r} of group "
                f"{ENTRY_POINT_GROUP}) failed to load: {type(err).__name__}: {err}; fix or "
                "uninstall the package that provides it"
            ) from err
        if _CONFIGS.get(point.name) is not loaded:
            raise UserError(
                f"entry point {point.name} = {point.value!r} ({ENTRY_POINT_GROUP}) must name a "
                f"StrategyConfig decorated with strategies.registry.register whose kind is "
                f"{point.name!r}"
            )
    _discovered = True


def strategy_configs() -> dict[str, type[StrategyConfig]]:
    """Every registered kind and its config section, sorted by kind."""
    _discover()
    return dict(sorted(_CONFIGS.items()))


def strategy_class(kind: str) -> type[Strategy]:
    """The Strategy class that trains ``kind`` (its driver module is imported here)."""
    from strategies.base import Strategy

    config = strategy_configs()[kind]
    cls = pkgutil.resolve_name(config.driver)
    if not (isinstance(cls, type) and issubclass(cls, Strategy) and cls.Config is config):
        raise TypeError(
            f"{config.driver} must be a Strategy subclass whose Config is {config.__name__}"
        )
    return cls


def _by_kind(
    value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
) -> StrategyConfig:
    """Validate a strategy section with the model its ``kind`` names. Looked up when a
    config is validated, so the union of strategies is never built at import time."""
    if isinstance(value, StrategyConfig):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("strategy_section", "expected a mapping with a `kind`")
    configs = strategy_configs()
    kind = value.get("kind")
    if not isinstance(kind, str) or kind not in configs:
        said = "no `kind`" if kind is None else f"unknown strategy kind {kind!r}"
        allowed = " | ".join(configs)
        raise PydanticCustomError("strategy_kind", f"{said}; allowed: {allowed}")
    return configs[kind].model_validate(value)


AnyStrategyConfig = Annotated[SerializeAsAny[StrategyConfig], WrapValidator(_by_kind)]
"""A field holding any registered strategy's section, validated by its ``kind``."""
