"""Bad configs stop before anything starts, with one message naming field, value and fix."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import RunConfig, apply_override, load_config
from orchestrator.errors import ClusterError, ConfigError
from strategies.registry import strategy_configs
from tests.conftest import small_config, write_config


def problems(tmp_path: Path, dataset_root: Path, **sections) -> str:
    path = write_config(tmp_path, small_config(tmp_path, dataset_root, **sections))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_a_valid_config_loads_and_takes_its_name_from_the_file(tmp_path, dataset_root):
    raw = small_config(tmp_path, dataset_root)
    del raw["run"]["name"]
    config = load_config(write_config(tmp_path, raw, "my-run.yaml"))
    assert config.run_name == "my-run"
    assert config.strategy.kind == "pipeline" and config.strategy.blocks == 3


def test_unknown_key_names_its_path(tmp_path, dataset_root):
    message = problems(tmp_path, dataset_root, strategy={"blokcs": 2})
    assert "strategy.blokcs: unknown key" in message


def test_wrong_type_names_path_and_value(tmp_path, dataset_root):
    message = problems(tmp_path, dataset_root, data={"batch_size": "many"})
    assert "data.batch_size" in message and "'many'" in message


def test_more_blocks_than_layers(tmp_path, dataset_root):
    message = problems(tmp_path, dataset_root, strategy={"blocks": 6})
    assert "strategy.blocks: 6 blocks but model.hidden has 4 layers; allowed: 1..4" in message


def test_zero_workers(tmp_path, dataset_root):
    message = problems(tmp_path, dataset_root, strategy={"blocks": 0})
    assert "strategy.blocks" in message and "greater than or equal to 1" in message


def test_negative_learning_rate(tmp_path, dataset_root):
    message = problems(tmp_path, dataset_root, strategy={"optimizer": {"lr": -0.1}})
    assert "strategy.optimizer.lr" in message and "-0.1" in message


def test_per_block_learning_rates_must_match_blocks(tmp_path, dataset_root):
    message = problems(tmp_path, dataset_root, strategy={"block_lr": [0.1, 0.1]})
    assert "block_lr has 2 values for 3 blocks" in message


def test_unknown_strategy_kind_lists_the_registered_ones(tmp_path, dataset_root):
    message = problems(tmp_path, dataset_root, strategy={"kind": "telepathy"})
    assert "telepathy" in message and "pipeline" in message and "backprop" in message


def test_both_or_neither_data_source(tmp_path, dataset_root):
    message = problems(tmp_path, dataset_root, data={"path": "x.parquet"})
    assert "exactly one of data.dataset" in message


def test_override_sets_nested_values_parsed_as_yaml(tmp_path, dataset_root):
    path = write_config(tmp_path, small_config(tmp_path, dataset_root))
    config = load_config(path, ["stop.max_steps=3", "strategy.aux_head=linear"])
    assert config.stop.max_steps == 3 and config.strategy.aux_head == "linear"
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_override({}, "stop.max_steps")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_reports_user_errors_in_one_message_without_traceback(tmp_path, dataset_root, capsys):
    path = write_config(tmp_path, small_config(tmp_path, dataset_root, strategy={"blocks": 9}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "strategy.blocks" in err
    assert "Traceback" not in err


def test_cli_missing_dataset(tmp_path, dataset_root, capsys):
    raw = small_config(tmp_path, dataset_root, data={"dataset": None, "path": str(tmp_path / "no")})
    assert main(["validate", str(write_config(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "Traceback" not in err


def test_cli_unknown_builtin_dataset(tmp_path, dataset_root, capsys):
    raw = small_config(tmp_path, dataset_root, data={"dataset": "mnist-please"})
    assert main(["run", str(write_config(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert "data.dataset" in err and "teacher" in err


def test_unreachable_ray_address_fails_fast_before_anything_starts(tmp_path, dataset_root, capsys):
    address = f"127.0.0.1:{_free_port()}"
    raw = small_config(tmp_path, dataset_root, resources={"address": address})
    path = write_config(tmp_path, raw)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "resources.address" in err and address in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "mlruns.db").exists()


def test_probe_error_is_a_cluster_error():
    from orchestrator.cluster import probe

    with pytest.raises(ClusterError, match="cannot reach Ray"):
        probe(f"127.0.0.1:{_free_port()}", timeout_s=1)


def test_strategies_command_lists_options(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "pipeline:" in out and "aux_head = 'augmented'" in out and "backprop:" in out


@pytest.mark.parametrize(
    "section", ["RunConfig", *sorted(strategy_configs())], ids=lambda name: name
)
def test_every_option_of_every_section_has_a_description(section):
    """What `unlocked strategies` and error messages show a user: read from JSON schemas,
    which hold every nested section (tasks, problems, search spaces) under $defs."""
    config = RunConfig if section == "RunConfig" else strategy_configs()[section]
    schema = config.model_json_schema()
    sections = {config.__name__: schema, **schema.get("$defs", {})}
    missing = [
        f"{name}.{field}"
        for name, part in sections.items()
        for field, spec in part.get("properties", {}).items()
        if not spec.get("description")
    ]
    assert missing == []
