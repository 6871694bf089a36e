"""Your own network: ``model.module`` names (or, through the Python API, is) a function
of the data's ``InputSpec`` that returns the units, the output layer last, as an
``nn.Sequential`` or a list of modules."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError
from strategies.config import CustomConfig
from strategies.models.units import Shape, activation_batch, run_modules


def resolve(module: str | Callable[..., Any]) -> Callable[..., Any]:
    """The function ``model.module`` names; ConfigError saying what is wrong with it."""
    if not isinstance(module, str):
        if not callable(module):
            raise ConfigError(f"model.module: {module!r} is not callable")
        return module
    path, _, name = module.partition(":")
    try:
        found: Any = importlib.import_module(path)
    except ImportError as err:
        raise ConfigError(
            f"model.module {module!r}: cannot import {path!r} ({err}); install the package or "
            "put its folder on PYTHONPATH (on a cluster: in the job's working_dir)"
        ) from None
    for part in name.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"model.module {module!r}: {path!r} has no {name!r}")
        found = getattr(found, part)
    if not callable(found):
        raise ConfigError(f"model.module {module!r}: {name!r} is a {type(found).__name__}")
    return found


def build(model: CustomConfig, spec: InputSpec) -> list[nn.Module]:
    """Call the function and check what it returns: modules, at least one unit and the
    output layer."""
    returned = resolve(model.module)(spec)
    if not isinstance(returned, (nn.Sequential, list, tuple)):
        raise ConfigError(
            f"model.module {_name(model)} returned a {type(returned).__name__}; return an "
            "nn.Sequential or a list of nn.Module (the units, the output layer last)"
        )
    modules = list(returned)
    strays = [
        f"{i}: {type(m).__name__}" for i, m in enumerate(modules) if not isinstance(m, nn.Module)
    ]
    if strays:
        raise ConfigError(
            f"model.module {_name(model)} returned elements that are not nn.Module "
            f"({', '.join(strays)})"
        )
    if len(modules) < 2:
        raise ConfigError(
            f"model.module {_name(model)} returned {len(modules)} module(s); return at least "
            "two: one unit or more, then the output layer"
        )
    return modules


def rebuild_units(
    model: CustomConfig,
    spec: InputSpec,
    chosen: Sequence[int],
    shape: Shape,
    shapes: Sequence[Shape],
) -> list[nn.Module]:
    """The chosen units of a second call of the function (drawing fresh weights from the
    head's seed), each checked to take what the aux net gives it."""
    fresh = build(model, spec)
    units = [fresh[unit] for unit in chosen]
    what = [f"unit {unit} ({type(fresh[unit]).__name__})" for unit in chosen]
    try:
        run_modules(units, activation_batch(shape), what)
    except ConfigError as err:
        raise ConfigError(
            f"model.module {_name(model)}: an AugLocal aux net reuses the units after a block, "
            f"but {err}; set strategy.aux_head: linear"
        ) from None
    return units


def _name(model: CustomConfig) -> str:
    module = model.module
    return repr(module) if isinstance(module, str) else getattr(module, "__qualname__", "?")
