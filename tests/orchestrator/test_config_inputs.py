"""Inputs that once crashed a worker, trained to NaN or printed a traceback: each is now one
ConfigError at load time naming the field (or the file and line), the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.config_yaml import MAX_NODES, expanded_size, parse_yaml
from orchestrator.errors import ConfigError
from orchestrator.schedule import HyperparameterSchedule, check_schedule_names
from tests.conftest import small_config, write_config


def load_error(tmp_path: Path, raw: dict, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, raw), list(overrides))
    return str(caught.value)


# Reading YAML


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\xff\x00", r"not UTF-8 text \(byte 0x89 at offset 0\)"),
        (
            "run: {name: x\nstop: 1\n",
            r"not valid YAML at line 2, column 5: .*check the indentation",
        ),
        ("strategy: !!python/object/apply:os.system [ls]\n", r"line 1, column 11: .*!!python"),
        (
            "stop: {max_steps: 5}\nrun: {}\nstop: {max_steps: 9}\n",
            r"duplicate key 'stop' \(first "
            r"on line 1, again on line 3\)",
        ),
        ("stop: {max_steps: 5, max_steps: 6}\n", r"line 1, column 22: duplicate key 'max_steps'"),
        (BILLION_LAUGHS, rf"aliases \(\*name\) expand to more than {MAX_NODES} values"),
        ("a: &a [*a]\n", r"refer to themselves"),
    ],
)
def test_a_config_file_yaml_cannot_read_names_the_file_and_line(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("stop.max_steps=[1", r"--set 'stop.max_steps=\[1': not valid YAML at line 1"),
        ("run.name=!!python/name:os.system", r"--set 'run.name=.*!!python"),
        ("strategy={a: 1, a: 2}", r"--set 'strategy=\{a: 1, a: 2\}': .*duplicate key 'a'"),
    ],
)
def test_a_set_value_yaml_cannot_read_names_the_item(tmp_path, dataset_root, item, expected):
    message = load_error(tmp_path, small_config(tmp_path, dataset_root), (item,))
    assert __import__("re").search(expected, message), message


def test_merge_keys_may_override_what_they_merge():
    text = "base: &b {lr: 0.1, kind: adam}\nopt: {<<: *b, lr: 0.2}\n"
    assert parse_yaml(text, "x")["opt"] == {"lr": 0.2, "kind": "adam"}


def test_alias_expansion_is_counted_without_expanding():
    root = yaml.compose(BILLION_LAUGHS)
    assert expanded_size(root, limit=10**12) > 9**8  # counted in a moment, never built


def test_the_cli_prints_one_line_for_a_binary_config(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and "Traceback" not in err


# Numbers


@pytest.mark.parametrize(
    ("sections", "field", "shown"),
    [
        ({"strategy": {"optimizer": {"lr": float("inf")}}}, "strategy.optimizer.lr", "inf"),
        ({"strategy": {"optimizer": {"lr": 1e300}}}, "strategy.optimizer.lr", "1e+300"),
        ({"strategy": {"optimizer": {"weight_decay": float("inf")}}}, "weight_decay", "inf"),
        ({"strategy": {"block_lr": [0.1, float("nan"), 0.1]}}, "strategy.block_lr.1", "nan"),
        ({"strategy": {"block_lr": [0.1, float("inf"), 0.1]}}, "strategy.block_lr.1", "inf"),
        ({"run": {"seed": 2**63}}, "run.seed", str(2**63)),
        ({"run": {"seed": 2**32}}, "run.seed", str(2**32)),
        ({"model": {"hidden": [64, 10**12, 64, 64]}}, "model.mlp.hidden.1", str(10**12)),
        ({"resources": {"cpus_per_worker": float("inf")}}, "resources.cpus_per_worker", "inf"),
        ({"data": {"num_classes": 10**12}}, "data.num_classes", str(10**12)),
        ({"stop": {"max_steps": 2**70}}, "stop.max_steps", str(2**70)),
    ],
)
def test_numbers_are_finite_and_in_range(tmp_path, dataset_root, sections, field, shown):
    message = load_error(tmp_path, small_config(tmp_path, dataset_root, **sections))
    assert field in message and shown in message, message


def test_eggroll_sigma_must_be_finite_and_bounded(tmp_path):
    for sigma, expected in ((float("inf"), "finite"), (1e9, "less than or equal to 1000")):
        raw = {"strategy": {"kind": "eggroll", "sigma": sigma}, "tracking": {"enabled": False}}
        message = load_error(tmp_path, raw)
        assert "strategy.sigma" in message and expected in message, message


def test_a_nested_section_of_a_strategy_is_checked_by_the_run(tmp_path):
    """A float of a section that allows inf itself (the PDE problem) is still refused."""
    raw = {
        "strategy": {"kind": "moe_hc", "problem": {"kind": "heat", "diffusivity": float("inf")}},
        "tracking": {"enabled": False},
    }
    message = load_error(tmp_path, raw)
    assert "strategy.problem.diffusivity: inf is not allowed; give a finite number" in message


def test_the_policy_width_of_a_gym_task_is_bounded(tmp_path):
    raw = {"strategy": {"kind": "eggroll", "task": {"kind": "gym", "hidden": [10**9]}}}
    assert "strategy.task.hidden[0]: 1000000000 is not allowed" in load_error(tmp_path, raw)


# Paths and the tracking section


def test_roots_must_be_folders_with_a_known_scheme(tmp_path, dataset_root):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        ({"checkpoint": {"root": str(a_file)}}, "checkpoint.root: a file, not a folder"),
        ({"data": {"root": str(a_file)}}, "data.root: a file, not a folder"),
        ({"checkpoint": {"root": "ftp://host/x"}}, "checkpoint.root: scheme 'ftp://' is not"),
        ({"data": {"root": "mem://x"}}, "data.root: scheme 'mem://'"),
    ]
    for sections, expected in cases:
        assert expected in load_error(tmp_path, small_config(tmp_path, dataset_root, **sections))
    data = {"dataset": None, "path": "nfs://server/rows.parquet"}
    assert "data.path: scheme 'nfs://'" in load_error(
        tmp_path, small_config(tmp_path, dataset_root, data=data)
    )
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("tracking", "expected"),
    [
        ({"uri": "htp://localhost:5000"}, "tracking.uri: scheme 'htp' is not an MLflow store"),
        ({"uri": "  "}, "tracking.uri: empty"),
        ({"experiment": ""}, "tracking.experiment"),
        ({"experiment": "   "}, "tracking.experiment"),
    ],
)
def test_tracking_syntax_is_checked(tmp_path, dataset_root, tracking, expected):
    assert expected in load_error(tmp_path, small_config(tmp_path, dataset_root, tracking=tracking))


@pytest.mark.parametrize(
    "uri", ["postgresql+psycopg2://u@h/db", "http://127.0.0.1:5000", "mlruns", "file:///tmp/m"]
)
def test_mlflow_stores_are_accepted(tmp_path, dataset_root, uri):
    load_config(write_config(tmp_path, small_config(tmp_path, dataset_root, tracking={"uri": uri})))


# Metrics, schedules, environments


def test_a_stop_metric_the_strategy_does_not_report_is_refused(tmp_path, dataset_root):
    target = {"target": {"metric": "eval/acuracy", "value": 0.9}}
    message = load_error(tmp_path, small_config(tmp_path, dataset_root, stop=target))
    assert "stop.target.metric: 'eval/acuracy' is not a metric" in message
    assert "did you mean 'eval/accuracy'?" in message
    target = {"target": {"metric": "eval/accuracy", "value": 0.9}}
    load_config(write_config(tmp_path, small_config(tmp_path, dataset_root, stop=target)))


def test_pbt_metric_and_stop_metric_are_checked_against_the_inner_strategy(tmp_path, dataset_root):
    raw = small_config(tmp_path, dataset_root)
    raw["strategy"] = {"kind": "pbt", "inner": {"kind": "backprop"}, "metric": "eval/los"}
    message = load_error(tmp_path, raw)
    assert "strategy.metric: 'eval/los'" in message and "'eval/loss'" in message
    raw["strategy"]["metric"] = "eval/loss"
    raw["stop"]["target"] = {"metric": "eval/best_trial", "value": 1, "mode": "min"}
    load_config(write_config(tmp_path, raw))


def test_a_schedule_naming_an_unknown_hyperparameter_is_refused():
    schedule = HyperparameterSchedule([(0, {"lr": 0.1}), (4, {"momentum": 0.5})])
    with pytest.raises(ConfigError, match=r"\['momentum'\] are not .* it has \['lr'\]"):
        check_schedule_names(schedule, ["lr"], "winner.yaml")
    check_schedule_names(HyperparameterSchedule([(0, {"lr": 0.1})]), ["lr"], "winner.yaml")


def test_an_unknown_gym_environment_lists_close_names(tmp_path):
    raw = {"strategy": {"kind": "eggroll", "task": {"kind": "gym", "env": "CartPol-v1"}}}
    message = load_error(tmp_path, raw)
    assert "strategy.task.env: 'CartPol-v1' is not a registered" in message
    assert "'CartPole-v1'" in message
    raw["strategy"]["task"]["env"] = "CartPole-v1"
    load_config(write_config(tmp_path, raw))


def test_a_huge_bad_value_is_not_echoed_whole(tmp_path, dataset_root):
    raw = small_config(tmp_path, dataset_root, stop={"max_steps": "x" * 200_000})
    message = load_error(tmp_path, raw)
    assert "stop.max_steps" in message and len(message) < 2_000
