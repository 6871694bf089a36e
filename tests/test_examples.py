"""Every shipped example is a valid, complete run config."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.data.source import check_dataset

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_is_an_example_per_strategy():
    from strategies.registry import strategy_configs

    kinds = {load_config(path).strategy.kind for path in EXAMPLES}
    assert kinds == set(strategy_configs())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates(path):
    config = load_config(path)
    assert config.run.name
    if config.data is not None and config.data.path is not None:
        check_dataset(config.data)
