"""The scaling benchmark's cost model: the arithmetic its README table rests on."""

from __future__ import annotations

import pytest

from benchmarks.cost_model import (
    EggrollCosts,
    PipelineCosts,
    core_share,
    eggroll_generation_s,
    pipeline_batch_s,
    relative_error,
    scaled_eggroll,
    scaled_pipeline,
)


def pipe(stages: list[float], call_s: float = 0.0, nbytes: float = 0.0) -> PipelineCosts:
    return PipelineCosts(stages, call_s, nbytes, bytes_per_s=1e6, batches_per_call=5)


def test_cores_are_shared_only_beyond_their_count():
    assert core_share(1, 2) == core_share(2, 2) == 1.0
    assert core_share(4, 2) == 2.0


def test_a_full_pipe_runs_at_its_slowest_stage():
    assert pipeline_batch_s(pipe([0.01, 0.03]), cores=2) == pytest.approx(0.03)


def test_pipeline_pays_call_overhead_per_call_and_transfer_per_batch():
    # 1 ms call over 5 batches per call, 1000 bytes at 1 MB/s: 0.2 ms + 1 ms.
    batch = pipeline_batch_s(pipe([0.01, 0.01], call_s=1e-3, nbytes=1000), cores=2)
    assert batch == pytest.approx(0.01 + 2e-4 + 1e-3)
    # One block sends nothing on.
    assert pipeline_batch_s(pipe([0.02], nbytes=1000), cores=2) == pytest.approx(0.02)


def test_more_blocks_than_cores_slow_every_stage():
    assert pipeline_batch_s(pipe([0.01] * 4), cores=2) == pytest.approx(0.02)


def test_eggroll_splits_evaluation_but_not_the_update():
    costs = EggrollCosts(member_s=1e-4, update_s=0.01, call_s=1e-3, population=100)
    one = eggroll_generation_s(costs, workers=1, cores=4)
    two = eggroll_generation_s(costs, workers=2, cores=4)
    assert one == pytest.approx(0.01 + 0.01 + 1e-3)
    assert two == pytest.approx(0.005 + 0.01 + 2e-3)
    # Beyond the cores, evaluation stops shrinking and the duplicated updates queue up.
    assert eggroll_generation_s(costs, workers=8, cores=4) == pytest.approx(0.0025 + 0.02 + 8e-3)


def test_scaling_a_model_scales_compute_not_calls():
    costs = EggrollCosts(member_s=1e-4, update_s=0.01, call_s=1e-3, population=10)
    big = scaled_eggroll(costs, 4.0)
    assert (big.member_s, big.update_s, big.call_s) == (4e-4, 0.04, 1e-3)
    cut = scaled_pipeline(
        pipe([0.01, 0.03], nbytes=100), blocks=4, compute_factor=2.0, width_factor=3.0
    )
    assert list(cut.stage_s) == pytest.approx([0.02] * 4)
    assert cut.bytes_per_batch == 300


def test_relative_error_is_signed():
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)
    assert relative_error(0.9, 1.0) == pytest.approx(-0.1)
