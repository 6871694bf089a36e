"""run.nonfinite: skip in the strategies' math, without Ray: EGGROLL leaves members with a
non-finite fitness out of its update, the pipeline's figures count only applied updates."""

from __future__ import annotations

import math

import numpy as np
import torch

from strategies.config import OptimizerConfig
from strategies.eggroll.lowrank import (
    NoiseSpec,
    enough_members,
    finite_members,
    shape_finite,
    shape_fitness,
)
from strategies.eggroll.tasks.configs import GymTaskConfig
from strategies.pipeline.driver import summarize
from workers.messages import BlockRecord
from workers.population import ESReplica

NAN, INF = math.nan, math.inf


def test_a_member_and_its_mirror_leave_together() -> None:
    fitness = torch.tensor([1.0, NAN, 2.0, 3.0, INF, 4.0])
    assert finite_members(fitness, antithetic=True).tolist() == [0, 0, 1, 1, 0, 0]
    assert finite_members(fitness, antithetic=False).tolist() == [1, 0, 1, 1, 0, 1]


def test_members_left_out_weigh_nothing_and_the_rest_are_shaped_among_themselves() -> None:
    fitness = torch.tensor([1.0, NAN, 5.0, 3.0, 2.0, 0.0])
    kept = finite_members(fitness, antithetic=True)
    shaped = shape_finite(fitness, kept, "centered_ranks")
    assert shaped[:2].tolist() == [0.0, 0.0]
    expected = shape_fitness(torch.tensor([5.0, 3.0, 2.0, 0.0]), "centered_ranks") * 6 / 4
    assert torch.equal(shaped[2:], expected)
    assert torch.isfinite(shaped).all()


def test_with_every_member_finite_shaping_is_unchanged() -> None:
    fitness = torch.tensor([0.5, 1.0, -2.0, 3.0])
    kept = finite_members(fitness, antithetic=True)
    assert torch.equal(shape_finite(fitness, kept, "zscore"), shape_fitness(fitness, "zscore"))


def test_a_generation_goes_on_with_at_least_half_its_members() -> None:
    assert enough_members(torch.tensor([True, True, False, False]))
    assert not enough_members(torch.tensor([True, False, False, False]))
    assert not enough_members(torch.tensor([False, False]))


def record(block: int, loss: float, applied: bool = True, skipped: int = 0) -> BlockRecord:
    return BlockRecord(block, loss, 5, 10, 0.0, 0.5, applied, skipped)


def test_the_pipeline_reports_the_loss_of_applied_updates() -> None:
    records = [
        [record(0, 1.0), record(1, 2.0)],
        [record(0, NAN, False, 1), record(1, NAN, False, 1)],
        [record(0, 3.0), record(1, 4.0)],
    ]
    metrics = summarize(records, 1.0)
    assert metrics["block-0/train/local_loss"] == 2.0
    assert metrics["train/loss"] == 3.0
    assert metrics["train/accuracy"] == 0.5  # every batch was still scored


def test_a_block_that_applied_nothing_stops_the_run() -> None:
    records = [
        [record(0, 1.0, False, 1), record(1, 2.0)],
        [record(0, 3.0, False, 1), record(1, 4.0)],
    ]
    metrics = summarize(records, 1.0)
    assert math.isnan(metrics["block-0/train/local_loss"])
    assert math.isnan(metrics["train/loss"])  # watched: the controller stops the run


def replica() -> ESReplica:
    return ESReplica(
        task=GymTaskConfig(max_episode_steps=20),
        model=None,
        dataset=None,
        optimizer=OptimizerConfig(kind="adam", lr=0.05),
        spec=NoiseSpec(rank=2),
        shaping="centered_ranks",
        seed=3,
    )


def test_a_replica_updates_on_its_finite_members_only() -> None:
    es = replica()
    before = [p.detach().clone() for p in es.params]
    fitness = np.linspace(0.0, 1.0, 8)
    fitness[3] = np.nan
    es.update(0, fitness, 0.1, 0.05)
    assert all(torch.isfinite(p).all() for p in es.params)
    assert any(not torch.equal(p, b) for p, b in zip(es.params, before))


def test_a_generation_without_a_finite_member_takes_no_step() -> None:
    es = replica()
    before = es.checksum()
    assert es.update(0, np.full(8, np.nan), 0.1, 0.05) == 0.0
    assert es.checksum() == before
