"""Every way `unlocked` ends is one message and an exit code, with no traceback unless
--verbose: a user's mistake (also one raised in a Ray worker) 2, a spent failure budget
1 with the last checkpoint and the command that continues the run, Ctrl-C 130, SIGTERM
143 (with nothing half-written left behind), a bug 1."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.cli import RunAttempt, _config_after_resume, _parser, main, yaml_scalar
from orchestrator.config import apply_override, validate_mapping
from orchestrator.errors import ConfigError, RunFailed
from tests.conftest import small_config, write_config

pytestmark = pytest.mark.usefixtures("restored_logging")  # main() configures logging


def ended(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The lines a command printed to stderr, after checking it printed no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and 'File "' not in err, err
    return err.splitlines()


BAD_FILES = {
    "binary": b"\x80\x81\xff\x00 not text",
    "invalid YAML": b"run: [unclosed\n",
    "unknown key": b"strategy: {kind: backprop}\nbogus: 1\n",
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_bad_config_file_is_one_message_and_exit_2(tmp_path, capsys, command, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert main([command, str(path)]) == 2
    lines = ended(capsys)
    assert lines[0].startswith(f"error: {path}") and sum(" error" in f" {x}" for x in lines) == 1


def test_verbose_adds_the_traceback_and_keeps_the_exit_code(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(BAD_FILES["invalid YAML"])
    assert main(["run", str(path), "--verbose"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ConfigError" in err
    assert err.rstrip().splitlines()[-1].startswith("error: ")


def test_a_config_error_from_anywhere_in_loading_is_exit_2(tmp_path, capsys, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise ConfigError("data.root: 'x' is a file; give a folder")

    monkeypatch.setattr("unlocked.load_config", refuse)
    assert main(["run", str(tmp_path / "any.yaml")]) == 2
    assert ended(capsys) == ["error: data.root: 'x' is a file; give a folder"]


def test_ctrl_c_while_loading_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("unlocked.load_config", interrupted)
    assert main(["run", str(tmp_path / "any.yaml")]) == 130
    assert ended(capsys) == ["stopped by SIGINT"]


def fake_run(config, store_dir: Path) -> SimpleNamespace:
    """What a callback sees of a run (``ActiveRun``): enough for ``RunAttempt``."""
    return SimpleNamespace(config=config, store=SimpleNamespace(uri=str(store_dir)))


def test_a_spent_failure_budget_names_the_failures_and_the_last_checkpoint(
    tmp_path, capsys, monkeypatch
):
    path = write_config(tmp_path, small_config(tmp_path, tmp_path / "data"))
    saved = tmp_path / "ckpt" / "lost" / "attempt" / "step-000000004"

    def lose_workers(config, *, resume, callbacks):
        (attempt,) = callbacks
        attempt.on_checkpoint(fake_run(config, saved.parent), 4, str(saved))
        raise RunFailed(
            "worker lost 2 times (resources.max_failures=1); last at step 5: ActorDiedError: "
            "The actor died unexpectedly before finishing this task.\n\tclass_name: BlockWorker"
        )

    monkeypatch.setattr("unlocked.run", lose_workers)
    assert main(["run", str(path), "--set", "run.name=lost"]) == 1
    first, checkpoint, resume = ended(capsys)
    assert first.startswith("error: worker lost 2 times (resources.max_failures=1); last at")
    assert checkpoint == f"last checkpoint: step 4 in {saved}"
    command = shlex.split(resume.removeprefix("continue with: "))
    assert command[command.index("run") :] == [
        "run", str(path), "--set", "run.name=lost", "--resume", "attempt"
    ]  # fmt: skip


def test_ctrl_c_after_a_checkpoint_prints_how_to_continue(tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path, small_config(tmp_path, tmp_path / "data"))
    saved = tmp_path / "ckpt" / "test-run" / "attempt" / "step-000000002"

    def aborted(config, *, resume, callbacks):
        callbacks[0].on_checkpoint(fake_run(config, saved.parent), 2, str(saved))
        raise KeyboardInterrupt  # a second Ctrl-C: the controller stops at once

    monkeypatch.setattr("unlocked.run", aborted)
    assert main(["run", str(path)]) == 130
    stopped, checkpoint, resume = ended(capsys)
    assert (stopped, checkpoint) == ("stopped by SIGINT", f"last checkpoint: step 2 in {saved}")
    assert resume.endswith(f" run {path} --set run.name=test-run --resume attempt")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_a_dataset_is_generated_leaves_no_staging_folder(
    tmp_path, capsys, monkeypatch, signum, code
):
    from orchestrator.data.builtin import BUILTIN_DATASETS

    digits = BUILTIN_DATASETS["digits"]
    assert digits.rows is not None

    def rows_until_signalled(split: str, size: int):
        for chunk in digits.rows(split, size):
            yield chunk
            os.kill(os.getpid(), signum)  # once the first rows are staged

    interrupted = dataclasses.replace(digits, rows=rows_until_signalled)
    monkeypatch.setitem(BUILTIN_DATASETS, "digits", interrupted)
    data = tmp_path / "data"
    path = write_config(tmp_path, small_config(tmp_path, data))
    previous = signal.getsignal(signal.SIGTERM)

    assert main(["run", str(path)]) == code
    assert ended(capsys) == [f"stopped by {signal.Signals(signum).name}"]
    assert (list(data.iterdir()) if data.exists() else []) == [], "nothing half-written"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_users_mistake_raised_in_a_ray_worker_is_shown_once_without_its_stack(
    ray_local, tmp_path, capsys, monkeypatch
):
    import ray

    @ray.remote
    class Worker:
        def forward(self, fault: str) -> None:
            if fault == "user":
                raise ConfigError("model.module: my_net returned a list, not a tensor")
            raise RuntimeError("index out of range")

    worker = Worker.remote()

    def run_on_ray(config, *, resume, callbacks):
        ray.get(worker.forward.remote(config.run_name))

    monkeypatch.setattr("unlocked.run", run_on_ray)
    path = write_config(tmp_path, small_config(tmp_path, tmp_path / "data"))
    assert main(["run", str(path), "--set", "run.name=user"]) == 2
    assert ended(capsys) == ["error: model.module: my_net returned a list, not a tensor"]
    assert main(["run", str(path), "--set", "run.name=bug"]) == 1
    assert ended(capsys) == [
        "error: internal error in a Ray worker: RuntimeError: index out of range",
        "(rerun with --verbose for the traceback)",
    ]
    assert main(["run", str(path), "--set", "run.name=user", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RayTaskError(ConfigError)" in err, err


def test_rays_repeat_of_an_unfetched_remote_error_is_dropped_unless_verbose(capsys):
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    ray_worker = logging.getLogger("ray._private.worker")
    ray_worker.addHandler(handler)
    try:
        for verbose in (False, True):
            main(["datasets"] + (["--verbose"] if verbose else []))
            ray_worker.error("Unhandled error (suppress with ...): ray::Block.step() ...")
            ray_worker.error("a worker's own error line")
    finally:
        ray_worker.removeHandler(handler)
    assert seen == [
        "a worker's own error line",
        "Unhandled error (suppress with ...): ray::Block.step() ...",
        "a worker's own error line",
    ]


def config_named(name: str):
    raw = {"run": {"name": name}, "strategy": {"kind": "backprop"}, "data": {"dataset": "digits"}}
    return validate_mapping(raw)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_a_pinned_value_reads_back_as_the_same_string(text):
    raw: dict = {}
    apply_override(raw, f"run.name={yaml_scalar(text)}")
    assert raw["run"]["name"] == text


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["stop.max_steps", "run.seed", "tracking.experiment"]),
            st.text(min_size=1).filter(lambda t: "\x00" not in t),
        ),
        max_size=4,
    ),
    # No NUL (no shell word holds one), no leading "-" (argparse would read an option).
    st.text(min_size=1).filter(lambda t: "\x00" not in t and not t.startswith("-")),
)
def test_the_resume_command_gives_back_the_same_arguments(overrides, config_path):
    """Whatever the path and the --set values hold (quotes, `;`, spaces), the printed
    command, split as a shell splits it, is the same config and the same overrides, with
    run.name and the attempt pinned after them."""
    given_overrides = [f"{key}={value}" for key, value in overrides]
    attempt = RunAttempt([config_path], given_overrides, False, config_named("pinned-run"))
    attempt.store = SimpleNamespace(uri="/ckpt/pinned-run/20260101-000000-000001")
    words = shlex.split(attempt.resume_command())
    args = _parser().parse_args(words[words.index("run") :])
    assert args.config == config_path and args.resume == "20260101-000000-000001"
    assert args.overrides == given_overrides + ["run.name=pinned-run"]


@pytest.mark.parametrize(
    ("words", "config", "resume"),
    [
        (["run", "r.yaml"], "r.yaml", False),
        (["run", "r.yaml", "--resume"], "r.yaml", True),
        (["run", "r.yaml", "--resume", "--set", "stop.max_steps=9"], "r.yaml", True),
        (
            ["run", "r.yaml", "--resume", "20260101-000000-000001"],
            "r.yaml",
            "20260101-000000-000001",
        ),
        (
            ["run", "--resume", "20260101-000000-000001", "r.yaml"],
            "r.yaml",
            "20260101-000000-000001",
        ),
        (["run", "--resume", "r.yaml"], "r.yaml", True),  # the option before the config
    ],
)
def test_resume_takes_an_optional_attempt(tmp_path, monkeypatch, words, config, resume):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("{}")
    args = _parser().parse_args(words)
    _config_after_resume(args)
    assert (args.config, args.resume) == (config, resume)


def test_an_environment_chosen_checkpoint_root_is_pinned(monkeypatch):
    monkeypatch.setenv("UNLOCKED_CHECKPOINT_ROOT", "/mnt/shared ckpts")
    attempt = RunAttempt(["r.yaml"], ["run.name=r"], True, config_named("r"))
    assert attempt.resume_command().endswith(
        " run r.yaml --set run.name=r --set 'checkpoint.root=/mnt/shared ckpts' --resume"
    )
