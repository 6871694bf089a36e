"""What the command line shows a new user: the closing lines' commands work as printed,
`unlocked strategies` lists every variant, and a run's first line is its progress."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import get_args

from orchestrator.cli import WINNER_SCHEDULE, closing_lines, main
from orchestrator.results import RunResult
from strategies.eggroll.tasks.configs import TaskConfig
from strategies.moe_hc.pde.configs import ProblemConfig
from tests.conftest import small_config, write_config

# No virtualenv on PATH: what a new user's shell has before `source .venv/bin/activate`.
BARE_PATH = "/usr/bin:/bin"


def finished(tmp_path: Path, **fields) -> RunResult:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    return RunResult(
        run_name="demo",
        step=4,
        metrics={"eval/accuracy": 0.5},
        checkpoint_dir=str(tmp_path / "ckpt"),
        mlflow_run_id="0123abcd",
        tracking_uri=uri,
        ui_url="http://127.0.0.1:5000/#/experiments/1/runs/0123abcd",
        **fields,
    )


def test_the_mlflow_ui_command_names_this_interpreter(tmp_path):
    lines = closing_lines(finished(tmp_path), "run.yaml")
    ui = next(line for line in lines if line.startswith("open the UI: "))
    command = shlex.split(ui.removeprefix("open the UI: "))
    assert command[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlruns.db"
    assert not any("winner" in line or "interrupted" in line for line in lines)


def test_a_pbt_run_prints_commands_that_fetch_and_replay_the_winners_schedule(tmp_path):
    from mlflow.tracking import MlflowClient

    result = finished(tmp_path, artifacts=[WINNER_SCHEDULE])
    client = MlflowClient(result.tracking_uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_text(run_id, "format: test-schedule\n", WINNER_SCHEDULE)
    result.mlflow_run_id = run_id

    lines = closing_lines(result, "pbt.yaml")
    header = lines.index(next(line for line in lines if "winner's schedule" in line))
    fetch, replay = (line.strip() for line in lines[header + 1 : header + 3])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": BARE_PATH, "HOME": os.environ.get("HOME", str(tmp_path))}
    done = subprocess.run(
        fetch, shell=True, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    replayed = shlex.split(replay)
    assert replayed[-3:-1] == ["run", "--replay-schedule"]
    assert (elsewhere / replayed[-1]).read_text() == "format: test-schedule\n"
    program = replayed[0]
    assert (
        program == "unlocked" or Path(program).is_file() or replayed[1:3] == ["-m", "orchestrator"]
    )


def test_an_interrupted_run_prints_how_to_resume_it(tmp_path):
    lines = closing_lines(finished(tmp_path, stopped_by="SIGINT"), "unlocked run run.yaml --resume")
    assert lines[-1] == "interrupted; continue with: unlocked run run.yaml --resume"


def test_strategies_lists_every_task_and_problem_kind_with_its_own_options(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for union in (TaskConfig, ProblemConfig):
        for variant in get_args(get_args(union)[0]):
            assert f"kind: {variant.model_fields['kind'].default}" in out
    # Options only a non-default variant has, with defaults, bounds and descriptions.
    assert "corpus_chars = 200000 (> 0) - " in out
    assert "viscosity = 0.001 (> 0) - " in out
    assert "batch_size = 256 (> 0) - Train rows every member is scored on." in out
    inner = next(line for line in out.splitlines() if line.strip().startswith("inner = "))
    assert all(kind in inner for kind in ("backprop", "eggroll", "moe_hc", "pipeline"))


def test_an_internal_error_is_one_message_and_verbose_shows_its_traceback(
    monkeypatch, capsys, restored_logging
):
    def broken() -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr("orchestrator.cli.cmd_datasets", broken)
    assert main(["datasets"]) == 1
    err = capsys.readouterr().err
    assert "error: internal error: RuntimeError: a bug" in err and "--verbose" in err
    assert "Traceback" not in err
    for argv in (["datasets", "--verbose"], ["--verbose", "datasets"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and 'raise RuntimeError("a bug")' in err
        assert err.rstrip().endswith("error: internal error: RuntimeError: a bug")


def test_a_runs_first_line_is_its_progress_in_one_format(tmp_path, dataset_root):
    """The start-up chatter of Ray (token auth) and MLflow (new database tables, system
    metrics) stays out of a run's output unless --verbose."""
    raw = small_config(tmp_path, dataset_root, tracking={"system_metrics": True})
    raw["strategy"] = {"kind": "backprop", "batches_per_step": 2}
    raw["stop"] = {"max_steps": 2}
    path = write_config(tmp_path, raw)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    ours = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ")
    lines = done.stderr.splitlines()
    assert lines and re.match(ours.pattern + r"step 1/2 ", lines[0]), done.stderr
    assert all(ours.match(line) for line in lines), done.stderr
    assert "open the UI: " in done.stdout


def test_tracking_upload_of_a_folder_that_is_no_buffer_is_one_message(tmp_path, capsys):
    assert main(["tracking-upload", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is no MLflow buffer" in err and "Traceback" not in err


def test_set_from_reads_overrides_verbatim_and_set_wins(tmp_path, dataset_root, capsys):
    from orchestrator.cli import _all_overrides, _parser
    from orchestrator.config import load_config

    tricky = "it's; $(touch pwned) `id`"
    file = tmp_path / "overrides.yaml"
    file.write_text(f'- "tracking.experiment={tricky}"\n- stop.max_steps=7\n')
    path = write_config(tmp_path, small_config(tmp_path, dataset_root))
    args = _parser().parse_args(
        ["validate", str(path), "--set-from", str(file), "--set", "stop.max_steps=9"]
    )
    config = load_config(path, _all_overrides(args))
    assert config.tracking.experiment == tricky
    assert config.stop.max_steps == 9  # the command line comes after the file
    assert not (tmp_path / "pwned").exists()
    file.write_text("stop.max_steps: 7\n")
    assert main(["validate", str(path), "--set-from", str(file)]) == 2
    assert "must be a YAML list of KEY.PATH=VALUE strings" in capsys.readouterr().err
