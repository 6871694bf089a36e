"""A rollback's factor goes on the restored checkpoint's learning rates, whatever factor
that checkpoint was written with; EGGROLL's scheduled rate (set relative to its own
generation's) is the case where halving the diverged step's rate would be wrong. No Ray:
the strategy's rates live in its driver object."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.config import validate_mapping
from orchestrator.controller import rescale_learning_rates
from strategies.eggroll.driver import EggrollStrategy


def eggroll(generation: int, lr_scale: float) -> EggrollStrategy:
    """An EGGROLL driver at ``generation`` whose rate falls linearly from 0.01 to 0.001
    over 11 generations, restored with ``lr_scale`` (no workers: rates only)."""
    config = validate_mapping(
        {
            "strategy": {
                "kind": "eggroll",
                "optimizer": {"kind": "adam", "lr": 0.01},
                "lr_final": 0.001,
                "lr_schedule": "linear",
                "task": {"kind": "classification"},
            },
            "data": {"dataset": "digits"},
            "stop": {"max_steps": 11},
        }
    )
    strategy = EggrollStrategy(config.strategy)
    strategy.ctx = SimpleNamespace(config=config)
    strategy.generation, strategy.lr_scale = generation, lr_scale
    return strategy


def test_a_rollback_halves_a_scheduled_rate_at_every_generation():
    diverged = eggroll(8, 1.0).hyperparameters()
    restored = eggroll(2, 1.0)  # the checkpoint of generation 2, written under factor 1
    sigma = restored.hyperparameters()["sigma"]
    rescale_learning_rates(restored, written=1.0, factor=0.5)
    assert restored.lr_scale == pytest.approx(0.5, rel=1e-12)
    restored.generation = 8  # replayed up to where it diverged: half the rate it ran at
    assert restored.hyperparameters() == pytest.approx(
        {"lr": diverged["lr"] / 2, "sigma": sigma}, rel=1e-12
    )


@pytest.mark.parametrize(
    ("written", "factor", "scale"),
    [
        (1.0, 0.25, 0.25),  # a second rollback to the same checkpoint halves again
        (0.5, 0.25, 0.25),  # a checkpoint written after the first rollback
        (0.5, 0.5, 0.5),  # a lost worker, back to a checkpoint with the rates of now
    ],
)
def test_the_restored_rates_are_rescaled_by_the_factor_they_lack(written, factor, scale):
    restored = eggroll(3, written)
    rescale_learning_rates(restored, written, factor)
    assert restored.lr_scale == pytest.approx(scale, rel=1e-12)
