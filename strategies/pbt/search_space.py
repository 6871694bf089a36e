"""Hyperparameter search spaces: where PBT samples a trial's first values and how it
perturbs them later.

A space is one of four shapes, written as a one-key mapping in the YAML:
``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (both ends
included) or ``{choice: [a, b, ...]}``. Perturbation follows Ray Tune's PBT: a number is
multiplied by one of the perturbation factors, a choice moves to a neighbouring option;
unlike Tune, every result is clipped back into the declared range, so an explored value
is always one the user allowed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Value = float | int | str | bool
Kind = Literal["uniform", "loguniform", "randint", "choice"]


class Distribution(BaseModel):
    """One hyperparameter's range; exactly one field is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uniform: tuple[float, float] | None = Field(
        default=None, description="[lo, hi]: any number between, evenly."
    )
    loguniform: tuple[float, float] | None = Field(
        default=None, description="[lo, hi], lo > 0: evenly on a log scale."
    )
    randint: tuple[int, int] | None = Field(
        default=None, description="[lo, hi]: an integer, both ends included."
    )
    choice: tuple[Value, ...] | None = Field(
        default=None, description="[a, b, ...]: one of these; explore moves to a neighbour."
    )

    @model_validator(mode="after")
    def _one_shape(self) -> Distribution:
        given = [k for k, v in self._shapes().items() if v]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of uniform: [lo, hi], loguniform: [lo, hi], "
                f"randint: [lo, hi] or choice: [a, b, ...] (got {given or 'none'})"
            )
        if self.choice is not None and len(self.choice) < 2:
            raise ValueError(f"choice {list(self.choice)} needs at least two options")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{self.kind}: [{bounds[0]}, {bounds[1]}] needs lo < hi")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: [{self.loguniform[0]}, ...] needs lo > 0")
        return self

    def __repr__(self) -> str:
        return f"{{{self.kind}: {list(self._shapes()[self.kind])}}}"

    def _shapes(self) -> dict[Kind, Any]:
        return {
            "uniform": self.uniform,
            "loguniform": self.loguniform,
            "randint": self.randint,
            "choice": self.choice,
        }

    @property
    def kind(self) -> Kind:
        for name, shape in self._shapes().items():
            if shape is not None:
                return name
        raise AssertionError("validated to have one shape")

    def sample(self, rng: random.Random) -> Value:
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        if self.loguniform is not None:
            lo, hi = self.loguniform
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        if self.randint is not None:
            return rng.randint(*self.randint)
        assert self.choice is not None
        return rng.choice(self.choice)

    def contains(self, value: Any) -> bool:
        if self.choice is not None:
            return value in self.choice
        lo, hi = self.uniform or self.loguniform or self.randint  # type: ignore[misc]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.randint is not None and int(value) != value:
            return False
        return lo <= value <= hi

    def perturb(self, value: Value, rng: random.Random, factors: Sequence[float]) -> Value:
        """A neighbour of ``value`` inside the range: scaled by a factor, or the next option."""
        if self.choice is not None:
            options = list(self.choice)
            index = options.index(value) if value in options else rng.randrange(len(options))
            step = rng.choice((-1, 1))
            return options[min(len(options) - 1, max(0, index + step))]
        lo, hi = self.uniform or self.loguniform or self.randint  # type: ignore[misc]
        factor = rng.choice(list(factors))
        scaled = float(value) * factor
        if self.randint is not None:
            moved = round(scaled)
            if moved == value and factor != 1.0:  # small integers: 2 * 1.2 rounds back to 2
                moved = int(value) + (1 if factor > 1.0 else -1)
            return int(min(hi, max(lo, moved)))
        return min(hi, max(lo, scaled))


SearchSpace = Mapping[str, Distribution]


def sample_space(space: SearchSpace, rng: random.Random) -> dict[str, Value]:
    """First values of a trial, drawn in the space's key order (reproducible from the seed)."""
    return {name: dist.sample(rng) for name, dist in space.items()}


def explore(
    values: Mapping[str, Value],
    space: SearchSpace,
    rng: random.Random,
    resample_probability: float,
    factors: Sequence[float],
) -> dict[str, Value]:
    """PBT's explore: each mutable value is resampled with ``resample_probability``,
    else perturbed. Values outside the space are left as they are."""
    out = dict(values)
    for name, dist in space.items():
        if rng.random() < resample_probability or name not in values:
            out[name] = dist.sample(rng)
        else:
            out[name] = dist.perturb(values[name], rng, factors)
    return out
