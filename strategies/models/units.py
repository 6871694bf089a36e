"""What each unit of a network takes, gives and costs, found by running it once.

A dry run on a two-example batch (eval mode, no gradient, the process RNG untouched) gives
every unit's per-example output shape and its forward FLOPs, counted by
``torch.utils.flop_counter.FlopCounterMode``. That is exact for any family, a custom one
included, where an analytic count would need one formula per layer type. Attention runs on
PyTorch's math kernel here: the fused CPU kernel is invisible to the FLOP counter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError

Shape = tuple[int, ...]
"""One example's shape, without the batch dimension."""

_BATCH = 2


@dataclass(frozen=True)
class UnitProfile:
    """One element of a network's ``nn.Sequential`` (a unit, or the output layer)."""

    name: str
    in_shape: Shape
    out_shape: Shape
    flops: int
    """Forward FLOPs per example."""


def example_batch(spec: InputSpec, batch: int = _BATCH) -> torch.Tensor:
    """A batch shaped and typed as the data gives it (token ids are integers)."""
    if spec.kind == "tokens":
        return torch.zeros((batch, *spec.shape), dtype=torch.long)
    return activation_batch(spec.shape, batch)


def activation_batch(shape: Shape, batch: int = _BATCH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator)


def expected_output(spec: InputSpec) -> Shape:
    """What the output layer must give per example: a class score each, or for language
    modelling a vocabulary score per position."""
    if spec.is_sequence:
        return (spec.shape[0], spec.num_classes)
    return (spec.num_classes,)


@contextmanager
def _dry_run(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode (batch norm keeps its running statistics, dropout is off), no autograd,
    attention on the kernel the FLOP counter sees; training flags restored after."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        for module in modules:
            module.eval()
        try:
            yield
        finally:
            for m, training in flags:
                m.training = training


def _describe(index: int, count: int, module: nn.Module) -> str:
    return (
        f"the output layer ({type(module).__name__})"
        if index == count - 1
        else f"unit {index} ({type(module).__name__})"
    )


def run_modules(
    modules: Sequence[nn.Module], x: torch.Tensor, what: Sequence[str]
) -> list[UnitProfile]:
    """Run ``modules`` one after the other on ``x``, measuring each; a module that cannot
    take its input raises ConfigError naming ``what[i]`` (e.g. "unit 3 (BasicBlock)")."""
    profiles = []
    with _dry_run(modules):
        for module, name in zip(modules, what):
            in_shape = tuple(x.shape[1:])
            try:
                with FlopCounterMode(display=False) as counter:
                    out = module(x)
            except Exception as err:  # a user's module can raise anything: name it
                raise ConfigError(
                    f"{name} cannot take input of shape {in_shape} per example "
                    f"({x.dtype}): {type(err).__name__}: {err}"
                ) from err
            if not isinstance(out, torch.Tensor):
                raise ConfigError(f"{name} returned a {type(out).__name__}, not a tensor")
            profiles.append(
                UnitProfile(
                    type(module).__name__,
                    in_shape,
                    tuple(out.shape[1:]),
                    counter.get_total_flops() // x.shape[0],
                )
            )
            x = out
    return profiles


def profile_network(network: nn.Sequential, spec: InputSpec) -> list[UnitProfile]:
    """Every unit's shapes and FLOPs, then the output layer's, which must give
    ``expected_output(spec)``."""
    count = len(network)
    what = [_describe(i, count, m) for i, m in enumerate(network)]
    profiles = run_modules(list(network), example_batch(spec), what)
    want = expected_output(spec)
    if profiles[-1].out_shape != want:
        raise ConfigError(
            f"{what[-1]} gives {profiles[-1].out_shape} per example; {spec.kind} data with "
            f"{spec.num_classes} classes wants {want}"
        )
    return profiles


def unit_shapes(network: nn.Sequential, spec: InputSpec) -> list[Shape]:
    """Per-example output shape of every unit (the output layer excluded)."""
    return [p.out_shape for p in profile_network(network, spec)[:-1]]


def forward_flops(module: nn.Module, shape: Shape) -> int:
    """Forward FLOPs per example of ``module`` (a head) on activations of ``shape``."""
    return run_modules([module], activation_batch(shape), ["the head"])[0].flops
