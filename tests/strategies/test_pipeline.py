"""Pure parts of the pipeline strategy: metric summaries and its config checks."""

from __future__ import annotations

import pytest

from strategies.pipeline.driver import PipelineConfig, summarize
from workers.messages import BlockRecord


def chain(t: float, losses: list[float], correct: list[int], count: int = 10) -> list[BlockRecord]:
    return [
        BlockRecord(block=k, loss=loss, correct=c, count=count, start=t + k, end=t + k + 0.5)
        for k, (loss, c) in enumerate(zip(losses, correct))
    ]


def test_training_summary_per_block_and_for_the_pipeline():
    records = [chain(0.0, [2.0, 1.0], [5, 6]), chain(1.0, [1.0, 0.5], [7, 8])]
    metrics = summarize(records, wall_s=2.0)
    assert metrics["block-0/train/local_loss"] == pytest.approx(1.5)
    assert metrics["block-0/train/aux_accuracy"] == pytest.approx(12 / 20)
    assert metrics["block-1/train/aux_accuracy"] == pytest.approx(14 / 20)
    assert metrics["block-0/system/busy_fraction"] == pytest.approx(1.0 / 2.0)
    assert metrics["block-1/train/samples_per_s"] == pytest.approx(20 / 2.0)
    # The pipeline's own numbers are the last block's.
    assert metrics["train/loss"] == pytest.approx(0.75)
    assert metrics["train/accuracy"] == pytest.approx(14 / 20)
    assert metrics["train/samples_per_s"] == pytest.approx(10.0)


def test_eval_summary_averages_summed_losses_over_samples():
    records = [chain(0.0, [20.0, 10.0], [9, 10]), chain(1.0, [10.0, 5.0], [8, 9])]
    metrics = summarize(records, wall_s=0.0, scope="eval")
    assert metrics["eval/loss"] == pytest.approx(15.0 / 20)
    assert metrics["eval/accuracy"] == pytest.approx(19 / 20)
    assert metrics["block-0/eval/aux_accuracy"] == pytest.approx(17 / 20)
    assert not any("busy" in key or "samples_per_s" in key for key in metrics)


def test_summary_of_nothing_is_empty():
    assert summarize([], wall_s=1.0) == {}


def test_config_counts_one_worker_per_block():
    assert PipelineConfig(blocks=4).num_workers() == 4


@pytest.mark.parametrize(
    ("per_call", "per_step", "in_flight", "expected"),
    [(5, 20, 4, 5), (5, 5, 4, 1), (2, 20, 4, 2), (8, 9, 2, 4)],
)
def test_a_call_carries_at_most_a_step_shared_by_the_calls_in_flight(
    per_call: int, per_step: int, in_flight: int, expected: int
):
    config = PipelineConfig(
        batches_per_call=per_call, batches_per_step=per_step, max_in_flight=in_flight
    )
    assert config.call_size() == expected


def test_batches_per_call_changes_the_calls_not_the_training(ray_local, tmp_path, dataset_root):
    """A block trains on the same batches in the same order however they are grouped into
    calls (one call per batch, or per four), so both runs end on the same numbers."""
    import unlocked
    from tests.conftest import small_config

    results = []
    for per_call in (1, 4):
        raw = small_config(
            tmp_path / str(per_call),
            dataset_root,
            strategy={"batches_per_call": per_call, "max_in_flight": 2},
            tracking={"enabled": False},
            stop={"max_steps": 4},
        )
        results.append(unlocked.run(raw))
    one, grouped = (r.metrics for r in results)
    for key in ("eval/accuracy", "eval/loss", "block-0/eval/aux_accuracy"):
        assert grouped[key] == one[key], key
