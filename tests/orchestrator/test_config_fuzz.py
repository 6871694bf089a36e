"""Random damage to the example configs, read the way `unlocked validate` reads them
(``load_config`` with ``--set`` items, then ``check_dataset``): every outcome is a valid
config or one ``UserError`` that names where the problem is, never another exception."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import RunConfig, load_config
from orchestrator.data.source import check_dataset
from orchestrator.errors import UserError

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
SEEDS = {path.name: yaml.safe_load(path.read_text()) for path in EXAMPLES}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KeyPath = tuple[Any, ...]

numbers = st.sampled_from(
    [0, -1, 2**31, 2**63, 2**64, 10**12, -(10**30), 1e300, -1e300, 1e-320, math.inf, -math.inf]
) | st.floats(allow_nan=True, allow_infinity=True)
scalars = (
    st.none()
    | st.booleans()
    | numbers
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.text(max_size=20)
    | st.sampled_from(["auto", "adam", "eval/accuracy", "s3://b/x", "ftp://h/x", "", "-1"])
)
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def paths(node: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """Every key path of a raw config, sections and values alike."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths(value, (*prefix, index))
    return found


def mutate(raw: dict[str, Any], path: KeyPath, how: str, value: Any) -> None:
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "unknown key" and isinstance(parent, dict):
        parent[f"{last}_typo"] = value
    elif (
        how == "scale"
        and isinstance(parent[last], (int, float))
        and not isinstance(parent[last], bool)
    ):
        parent[last] = parent[last] * value if isinstance(value, (int, float)) else -parent[last]
    else:
        parent[last] = value


def names_a_place(message: str, touched: list[KeyPath]) -> bool:
    """The message names a key on a damaged path (a field, its section), or a line of the
    YAML, or the ``--set`` item."""
    keys = {str(k) for path in touched for k in path if isinstance(k, str) and k}
    return any(k in message for k in keys) or "line " in message or "--set " in message


def validate(path: Path, overrides: list[str]) -> RunConfig:
    config = load_config(path, overrides)
    # A built-in's checks read no files; a damaged data.path could name "/" and walk the
    # whole disk for Parquet files (your own data's checks are in test_data.py).
    if config.data is not None and config.data.path is None:
        check_dataset(config.data)
    return config


def check_outcome(path: Path, overrides: list[str], touched: list[KeyPath]) -> None:
    try:
        validate(path, overrides)
    except UserError as err:
        message = str(err)
        assert message.strip() and len(message) < 20_000, message[:2000]
        assert names_a_place(message, touched), (touched, overrides, message)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    data=st.data(),
)
def test_damaged_configs_fail_with_a_message_naming_the_field(workdir, seed, data):
    raw = copy.deepcopy(SEEDS[seed])
    touched: list[KeyPath] = []
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        options = paths(raw)
        if not options:
            break
        path = data.draw(st.sampled_from(options), label="path")
        how = data.draw(st.sampled_from(["replace", "delete", "unknown key", "scale"]))
        mutate(raw, path, how, data.draw(junk, label="value"))
        touched.append(path)
    file = workdir / "fuzzed.yaml"
    file.write_text(yaml.safe_dump(raw, allow_unicode=True))
    check_outcome(file, [], touched)


@FUZZ
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    data=st.data(),
)
def test_damaged_set_items_fail_with_a_message_naming_the_item(workdir, seed, data):
    raw = SEEDS[seed]
    options = [".".join(map(str, p)) for p in paths(raw) if all(isinstance(k, str) for k in p)]
    key = data.draw(st.sampled_from(options) | st.text(max_size=12), label="key")
    value = data.draw(
        st.text(max_size=30)
        | junk.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
        label="value",
    )
    item = data.draw(st.sampled_from([f"{key}={value}", key, f"={value}"]), label="item")
    file = workdir / "seed.yaml"
    file.write_text(yaml.safe_dump(raw))
    named = tuple(item.partition("=")[0].strip().split("."))  # as apply_override reads it
    check_outcome(file, [item], [named])


@FUZZ
@given(text=st.binary(max_size=200) | st.text(max_size=200))
def test_any_file_content_is_a_config_or_a_user_error(workdir, text):
    file = workdir / "anything.yaml"
    file.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        validate(file, [])
    except UserError as err:
        assert str(err).startswith(str(file)) or "does not exist" in str(err), str(err)
