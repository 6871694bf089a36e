"""A damaged newest checkpoint is passed over, in recovery and in --resume; a failing run
leaves no checkpoint folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

import unlocked
from orchestrator.checkpoint import CheckpointStore
from orchestrator.cli import main
from tests.conftest import on_step, small_config, write_config

KEYS = ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy")


def backprop_run(tmp_path: Path, dataset_root: Path, **sections: Any) -> dict[str, Any]:
    """One worker, so a run takes seconds: 6 steps, a checkpoint every 2, the last 2 kept."""
    raw = small_config(
        tmp_path,
        dataset_root,
        tracking={"enabled": False},
        stop={"max_steps": 6},
        checkpoint={"every": 2, "keep": 2},
        **sections,
    )
    return {**raw, "strategy": {"kind": "backprop", "batches_per_step": 4}}


def truncate_newest(root: Path) -> Path:
    """Cut the end off one file of the newest complete checkpoint under ``root``."""
    newest = sorted(root.glob("test-run/*/step-*/manifest.json"))[-1].parent
    victim = next(newest.glob("*.pt"))
    victim.write_bytes(victim.read_bytes()[:-100])
    return newest


@pytest.fixture(scope="module")
def calm(ray_local, tmp_path_factory, dataset_root) -> unlocked.RunResult:
    """The run never interrupted, whose figures the damaged runs must end on."""
    return unlocked.run(backprop_run(tmp_path_factory.mktemp("calm"), dataset_root))


@pytest.mark.slow
def test_recovery_passes_over_a_damaged_checkpoint_to_the_uninterrupted_run(
    calm, tmp_path, dataset_root, caplog
):
    damaged: list[Path] = []

    def damage_then_kill(run: Any, step: int, metrics: dict) -> None:
        if step == 5 and not damaged:  # checkpoints 2 and 4 exist
            damaged.append(truncate_newest(tmp_path / "ckpt"))
            ray.kill(run.strategy.worker)

    raw = backprop_run(tmp_path, dataset_root)
    with caplog.at_level(logging.WARNING, logger="unlocked"):
        result = unlocked.run(raw, callbacks=[on_step(damage_then_kill)])

    assert damaged and damaged[0].name == "step-000000004"
    assert result.failures == 1 and result.step == 6
    assert [s for s, _ in result.history] == [1, 2, 3, 4, 5, 6]  # 3-5 replayed from step 2
    [line] = [m for m in caplog.messages if "is damaged and skipped" in m]
    assert str(damaged[0]) in line and "bytes, expected" in line
    assert {k: result.metrics[k] for k in KEYS} == {k: calm.metrics[k] for k in KEYS}


@pytest.mark.slow
def test_resume_passes_over_a_damaged_checkpoint_to_the_uninterrupted_run(
    calm, tmp_path, dataset_root, caplog
):
    def interrupt(run: Any, step: int, _metrics: dict) -> None:
        if step == 4:
            run.controller.stop_signal = "SIGTERM"

    first = unlocked.run(backprop_run(tmp_path, dataset_root), callbacks=[on_step(interrupt)])
    assert first.step == 4 and first.stopped_by == "SIGTERM"
    damaged = truncate_newest(tmp_path / "ckpt")
    assert damaged.name == "step-000000004"

    with caplog.at_level(logging.WARNING, logger="unlocked"):
        resumed = unlocked.run(backprop_run(tmp_path, dataset_root), resume=True)

    assert [s for s, _ in resumed.history] == [3, 4, 5, 6]
    assert any(str(damaged) in m and "is damaged and skipped" in m for m in caplog.messages)
    assert {k: resumed.metrics[k] for k in KEYS} == {k: calm.metrics[k] for k in KEYS}


def test_resume_with_no_intact_checkpoint_is_one_user_error(tmp_path, dataset_root, capsys, caplog):
    attempt = tmp_path / "ckpt" / "test-run" / "20260101-000000-000000"
    store = CheckpointStore(str(attempt))
    for step in (2, 4):
        store.save(step, {"trainer-0": torch.zeros(8)})
        (attempt / f"step-{step:09d}" / "trainer-0.pt").write_bytes(b"cut short")
    path = write_config(tmp_path, backprop_run(tmp_path, dataset_root))

    with caplog.at_level(logging.WARNING, logger="unlocked"):
        assert main(["run", str(path), "--resume"]) == 2

    assert sum("is damaged and skipped" in m for m in caplog.messages) == 2
    err = capsys.readouterr().err
    [message] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert f"every checkpoint of run 'test-run' in {attempt} is damaged" in message
    assert "run without --resume" in message and "Traceback" not in err


def test_a_run_failing_its_checks_leaves_no_checkpoint_folder(tmp_path, dataset_root, capsys):
    raw = small_config(tmp_path, dataset_root, data={"batch_size": 4096})
    assert main(["run", str(write_config(tmp_path, raw))]) == 2
    assert "data.batch_size: 4096" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
