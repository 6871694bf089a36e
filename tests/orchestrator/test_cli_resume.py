"""The command an interrupted run prints continues that run, run as printed, even where
another run holds the name its config file would give it, or a newer attempt its own."""

from __future__ import annotations

import os
import shlex
import shutil
import signal

import pytest

from orchestrator.cli import RunAttempt, main
from tests.conftest import small_config, write_config

pytestmark = pytest.mark.slow


def printed(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix)).removeprefix(prefix)


def test_the_printed_resume_command_continues_this_run(
    ray_local, tmp_path, dataset_root, capsys, monkeypatch
):
    raw = small_config(tmp_path, dataset_root, tracking={"enabled": False}, stop={"max_steps": 6})
    raw["strategy"] = {"kind": "backprop", "batches_per_step": 2}  # one worker: seconds
    path = write_config(tmp_path, raw)  # run.name: test-run
    on_step_end = RunAttempt.on_step_end

    def terminated_at_step_3(self, run, step, metrics):
        on_step_end(self, run, step, metrics)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunAttempt, "on_step_end", terminated_at_step_3)
    assert main(["run", str(path), "--set", "run.name=hinted"]) == 143
    out = capsys.readouterr().out
    monkeypatch.undo()
    assert "run 'hinted' stopped at step 3 (SIGTERM)" in out
    interrupted = printed(out, "checkpoints: ")
    command = shlex.split(printed(out, "interrupted; continue with: "))
    assert command[-2:] == ["--resume", os.path.basename(interrupted)]
    # Later runs with a checkpoint, under the file's name and under this very name (started
    # again after the interruption): what a bare `run FILE --resume` or
    # `run FILE --set run.name=hinted --resume` would take up.
    for name in ("test-run", "hinted"):
        shutil.copytree(interrupted, tmp_path / "ckpt" / name / "99999999-999999-999999")

    assert main(command[command.index("run") :]) == 0
    out = capsys.readouterr().out
    assert "run 'hinted' stopped at step 6 (max_steps)" in out
    assert printed(out, "checkpoints: ") == interrupted
