"""Shared fixtures: one local Ray for the session, small configs on the `digits` data."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Every Ray a test starts is single-machine and listens on loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in datasets generated once per session, shared by every test."""
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture
def restored_logging():
    """The levels `unlocked`'s main() sets, put back: a CLI test must not quiet the next."""
    names = ["", "mlflow", "unlocked", "alembic", "sqlalchemy.engine"]
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)


def free_port() -> int:
    """A TCP port free on loopback now (servers a test starts listen on 127.0.0.1 only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, raw: dict[str, Any], name: str = "run.yaml") -> Path:
    """A raw config as the YAML file a user would pass to `unlocked`."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def small_config(tmp_path: Path, dataset_root: Path, **sections: Any) -> dict[str, Any]:
    """A raw config dict of a small pipeline run on `digits`, tracked in a temp SQLite."""
    raw: dict[str, Any] = {
        "run": {"name": "test-run", "seed": 0},
        "strategy": {
            "kind": "pipeline",
            "blocks": 3,
            "aux_head": "augmented",
            "aux_depth": 2,
            "batches_per_step": 8,
            "max_in_flight": 3,
            "optimizer": {"kind": "adam", "lr": 0.002},
        },
        "model": {"hidden": [64, 64, 64, 64]},
        "data": {"dataset": "digits", "batch_size": 64, "root": str(dataset_root)},
        "tracking": {
            "uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
            "experiment": "tests",
            "system_metrics": False,
        },
        "checkpoint": {"root": str(tmp_path / "ckpt"), "every": 2, "keep": 2},
        "stop": {"max_steps": 8},
        "eval": {"every": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def on_step(hook: Callable[[Any, int, dict[str, float]], None]) -> Any:
    """A callback that calls ``hook(run, step, metrics)`` after every step (faults, probes)."""
    from unlocked import Callback

    class OnStep(Callback):
        def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
            hook(run, step, metrics)

    return OnStep()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where CUDA is; elsewhere they are reported as skipped, with why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: no GPU on this machine (run with -m gpu on one)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
