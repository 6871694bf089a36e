"""Checkpoint storage that fails under a run, and bad inputs: the chaos benchmark's storage
scenarios, small enough for CI (the MLflow restart is tests/orchestrator/test_tracking_server.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import unlocked
from benchmarks.chaos_inputs import judge_inputs
from benchmarks.chaos_storage import (
    checkpoint_write_interrupted,
    figures,
    run_config,
    storage_refuses_writes,
)

pytestmark = pytest.mark.usefixtures("restored_logging")  # bad inputs go through main()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow database for the module: creating one costs seconds."""
    return tmp_path_factory.mktemp("chaos-storage")


def backprop_run(shared: Path, folder: Path, dataset_root: Path) -> dict[str, Any]:
    return run_config(folder, dataset_root, "backprop", 0, f"sqlite:///{shared / 'mlruns.db'}")


@pytest.fixture(scope="module")
def calm(ray_local, shared, dataset_root) -> dict[str, float]:
    """The figures of the run with no fault, which every faulted run must end on."""
    folder = shared / "calm"
    folder.mkdir()
    return figures(unlocked.run(backprop_run(shared, folder, dataset_root)).metrics)


@pytest.mark.slow
def test_a_checkpoint_cut_short_by_a_dying_driver_resumes_on_the_fault_free_figures(
    calm, shared, tmp_path, dataset_root
):
    outcome = checkpoint_write_interrupted(backprop_run(shared, tmp_path, dataset_root), calm)
    assert outcome.detail.startswith("died writing") and "resumed at step 5" in outcome.detail
    assert outcome.metric_delta == 0.0, outcome
    assert outcome.clean and (outcome.steps_duplicated, outcome.steps_missing) == (0, 0), outcome


@pytest.mark.slow
def test_read_only_storage_stops_the_run_keeping_its_checkpoint_then_resume_finishes(
    calm, shared, tmp_path, dataset_root
):
    raw = backprop_run(shared, tmp_path, dataset_root)
    outcome = storage_refuses_writes(raw, calm, "read-only", after_step=2)
    assert "; stopped at the step-4 checkpoint" in outcome.detail, outcome
    assert "kept step 2; MLflow FAILED, after --resume FINISHED" in outcome.detail, outcome
    assert outcome.metric_delta == 0.0, outcome
    assert outcome.clean, outcome


def test_every_bad_input_of_the_quick_list_is_one_message_and_exit_2():
    verdicts = judge_inputs(quick=True)
    assert len(verdicts) >= 100
    assert [(v.label, v.problem) for v in verdicts if not v.clean] == []
