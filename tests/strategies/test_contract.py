"""The strategy contract, checked on every registered strategy with a tiny run of each.

A new strategy must add its tiny config to ``TINY`` (the parametrisation fails otherwise):
its config round-trips, its hyperparameters are the ones its config declares, its state
restores to itself, its metrics follow the one naming scheme, its headline metrics are
reported, and every worker's peak training memory is measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import unlocked
from strategies.base import Strategy, metric_scope
from strategies.registry import strategy_class, strategy_configs

BACKPROP = {"kind": "backprop", "batches_per_step": 2, "optimizer": {"lr": 0.01}}


def tiny(kind: str, tmp_path: Path, dataset_root: Path) -> dict[str, Any]:
    """A run of ``kind`` small enough for a unit test, with nothing of its own left out."""
    digits = {"dataset": "digits", "batch_size": 64, "root": str(dataset_root)}
    strategies: dict[str, dict[str, Any]] = {
        "backprop": {"strategy": BACKPROP, "data": digits},
        "pipeline": {
            "strategy": {"kind": "pipeline", "blocks": 2, "batches_per_step": 2},
            "data": digits,
        },
        "eggroll": {
            "strategy": {
                "kind": "eggroll",
                "population": 8,
                "workers": 2,
                "task": {"kind": "gym", "hidden": [8], "max_episode_steps": 20, "eval_episodes": 2},
            }
        },
        "moe_hc": {
            "strategy": {
                "kind": "moe_hc",
                "problem": {
                    "kind": "heat",
                    "root": str(dataset_root / "pde"),
                    "train_instances": 8,
                    "test_instances": 2,
                    "nx": 16,
                    "nt": 9,
                },
                "experts": {"x": 2},
                "basis": {"functions": 8, "width": 16, "depth": 2},
                "constraint_points": 64,
                "boundary_points": 8,
                "data_points": 32,
                "batches_per_step": 1,
            }
        },
        "noprop": {
            "strategy": {"kind": "noprop", "blocks": 2, "batches_per_step": 2, "width": 16},
            "data": digits,
        },
        "pbt": {
            "strategy": {
                "kind": "pbt",
                "population": 2,
                "interval": 1,
                "concurrent_trials": 1,
                "search_space": {"lr": {"loguniform": [1e-3, 1e-1]}},
                "inner": BACKPROP,
            },
            "data": digits,
        },
        "zo": {"strategy": {"kind": "zo", "batches_per_step": 2, "workers": 2}, "data": digits},
    }
    if kind not in strategies:
        pytest.fail(f"strategy {kind!r} has no tiny config in {__file__}: add one")
    return {
        "run": {"name": f"contract-{kind}", "seed": 0},
        "model": {"hidden": [16, 16]},
        "tracking": {"enabled": False},
        "checkpoint": {"root": str(tmp_path / "ckpt"), "every": 1},
        "stop": {"max_steps": 2},
        "eval": {"every": 1, "max_batches": 2},
        **strategies[kind],
    }


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


KINDS = sorted(strategy_configs())


@pytest.mark.parametrize("kind", KINDS)
def test_the_config_round_trips_and_its_driver_is_a_strategy(kind, tmp_path, dataset_root):
    config = unlocked.load_config(tiny(kind, tmp_path, dataset_root))
    section = config.strategy
    assert type(section) is strategy_configs()[kind]
    again = type(section).model_validate(yaml.safe_load(yaml.safe_dump(section.model_dump())))
    assert again == section
    whole = unlocked.load_config(config.model_dump(mode="json"))
    assert whole == config
    cls = strategy_class(kind)
    assert issubclass(cls, Strategy) and cls.Config is type(section)
    assert section.num_workers() >= 1
    assert section.summary()


class ContractProbe(unlocked.Callback):
    """At the last step: the state restores to itself and the hyperparameters match."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.checked = False

    def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append(dict(metrics))
        if step != run.config.stop.max_steps:
            return
        strategy = run.strategy
        assert sorted(strategy.hyperparameters()) == sorted(
            run.config.strategy.hyperparameter_names()
        )
        before = strategy.state()
        strategy.restore(before)
        assert_same(before, strategy.state())
        self.headline = strategy.headline_metrics()
        self.checked = True


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_run_keeps_the_contract(kind, ray_local, tmp_path, dataset_root):
    probe = ContractProbe()
    result = unlocked.run(tiny(kind, tmp_path, dataset_root), callbacks=[probe])
    assert probe.checked and result.step == 2
    keys = {key for metrics in probe.metrics for key in metrics}
    unscoped = sorted(key for key in keys if metric_scope(key) is None)
    assert not unscoped, f"metrics outside the train/ eval/ system/ scheme: {unscoped}"
    missing = [key for key in probe.headline if key not in keys]
    assert not missing, f"headline metrics never reported: {missing}"
    assert result.peak_training_bytes, "no worker reported its peak training memory"
    assert all(value > 0 for value in result.peak_training_bytes.values())
