"""Bring your own network: a function of the data's shape that returns the units, trained
as a 2-block update-unlocked pipeline and, for comparison, end to end.

    python examples/custom-module.py                          # both runs, about a minute
    python examples/custom-module.py --set stop.max_steps=4   # any config value, as --set

Each element of the returned list is one unit; the pipeline places contiguous units on
its blocks (balancing their measured FLOPs, local heads included) and gives every block
but the last a local head built from the unit's output shape. The last element is the
output layer. Through the Python API the function itself goes in ``model.module``; in a
YAML config, name it as ``"package.module:function"`` importable on every worker.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from torch import nn

import unlocked
from orchestrator.data.spec import InputSpec


def small_cnn(spec: InputSpec) -> list[nn.Module]:
    """Three conv units and a classifier for images of any size and channel count."""
    channels = spec.shape[0]

    def conv(inputs: int, outputs: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
        )

    return [
        conv(channels, 32),
        conv(32, 64),
        conv(64, 64),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, spec.num_classes)),
    ]


def config(strategy: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": {"name": f"custom-{strategy['kind']}", "seed": 0},
        "strategy": {
            **strategy,
            "batches_per_step": 10,
            "optimizer": {"kind": "adam", "lr": 0.003},
        },
        "model": {"kind": "custom", "module": small_cnn},
        "data": {"dataset": "digits-images", "batch_size": 64},
        "checkpoint": {"every": 10},
        "stop": {"max_steps": 20},
        "eval": {"every": 10},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    strategies = [{"kind": "pipeline", "blocks": 2, "aux_head": "linear"}, {"kind": "backprop"}]
    try:
        configs = [unlocked.load_config(config(s), overrides=args.overrides) for s in strategies]
    except unlocked.UserError as err:  # a mistake in the config: one message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    for run_config in configs:
        result = unlocked.run(run_config)
        print(f"{run_config.run_name}: eval/accuracy {result.metrics['eval/accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
