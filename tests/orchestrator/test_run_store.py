"""Which attempt folder a run writes and ``--resume`` reads: a fresh run gets a new one,
``--resume`` the newest that holds a checkpoint, ``--resume ATTEMPT`` that one and no
other. No Ray: checkpoints are written straight to the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.checkpoint import CheckpointStore
from orchestrator.config import RunConfig, validate_mapping
from orchestrator.controller import open_run_store
from orchestrator.errors import UserError

OLDER, NEWER, EMPTY = "20260101-000000-000001", "20260102-000000-000001", "20260103-000000-1"


def config(tmp_path: Path) -> RunConfig:
    raw = {
        "run": {"name": "r"},
        "strategy": {"kind": "backprop"},
        "data": {"dataset": "digits"},
        "checkpoint": {"root": str(tmp_path / "ckpt")},
    }
    return validate_mapping(raw)


@pytest.fixture
def attempts(tmp_path: Path) -> RunConfig:
    """Run ``r`` with two attempts holding a checkpoint (steps 2 and 5) and a newest one
    whose only checkpoint never got its manifest."""
    run = config(tmp_path)
    for attempt, step in ((OLDER, 2), (NEWER, 5)):
        CheckpointStore(str(tmp_path / "ckpt" / "r" / attempt)).save(step, {"n": step})
    (tmp_path / "ckpt" / "r" / EMPTY / "step-000000007").mkdir(parents=True)
    return run


def test_resume_takes_the_newest_attempt_that_holds_a_checkpoint(attempts):
    store, restored = open_run_store(attempts, True)
    assert store.uri.endswith(f"/r/{NEWER}")
    assert restored is not None and restored[0].step == 5 and restored[1] == {"n": 5}


def test_resume_with_an_attempt_takes_that_one_even_when_a_newer_one_exists(attempts):
    store, restored = open_run_store(attempts, OLDER)
    assert store.uri.endswith(f"/r/{OLDER}")
    assert restored is not None and restored[0].step == 2 and restored[1] == {"n": 2}


@pytest.mark.parametrize("given", ["20991231-000000-000000", "", "..", f"x/{OLDER}"])
def test_a_missing_attempt_is_a_user_error_naming_those_that_exist(attempts, given):
    with pytest.raises(UserError) as caught:
        open_run_store(attempts, given)
    message = str(caught.value)
    assert message.startswith(f"--resume {given!r}: no such attempt;")
    assert f"are {OLDER}, {NEWER}, {EMPTY}." in message


def test_an_attempt_without_a_complete_checkpoint_is_a_user_error(attempts):
    with pytest.raises(UserError, match=f"attempt {EMPTY} of run 'r' .* holds no complete"):
        open_run_store(attempts, EMPTY)


def test_an_attempt_of_a_run_never_started_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run 'r' has no attempt under"):
        open_run_store(config(tmp_path), OLDER)


def test_a_fresh_run_gets_a_new_attempt_folder(attempts):
    store, restored = open_run_store(attempts, False)
    assert restored is None and Path(store.uri).name not in (OLDER, NEWER, EMPTY)
