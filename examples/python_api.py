"""Drive unlocked from Python, as from a notebook: build a config, watch the run with a
callback, read the result.

    python examples/python_api.py                          # 30 steps, about a minute
    python examples/python_api.py --set stop.max_steps=4   # any config value, as the CLI's --set

The config is a plain mapping here (a YAML path or a ``unlocked.RunConfig`` work as well):
a 2-block update-unlocked pipeline on scikit-learn's digits, tracked in ./mlruns.db.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import unlocked

CONFIG: dict[str, Any] = {
    "run": {"name": "python-api", "seed": 0},
    "strategy": {
        "kind": "pipeline",
        "blocks": 2,
        "aux_head": "augmented",
        "batches_per_step": 10,
        "optimizer": {"kind": "adam", "lr": 0.002},
    },
    "model": {"hidden": [128, 128, 128]},
    "data": {"dataset": "digits", "batch_size": 64},
    "checkpoint": {"every": 10},
    "stop": {"max_steps": 30},
    "eval": {"every": 5},
}


class BestAccuracy(unlocked.Callback):
    """Remembers the best held-out accuracy and says when checkpoints land."""

    def __init__(self) -> None:
        self.best = (0.0, 0)

    def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        accuracy = metrics.get("eval/accuracy")
        if accuracy is not None and accuracy > self.best[0]:
            self.best = (accuracy, step)

    def on_checkpoint(self, run: Any, step: int, path: str) -> None:
        print(f"checkpoint of step {step}: {path}")

    def on_failure(self, run: Any, error: BaseException, failures: int) -> None:
        print(f"a worker was lost ({type(error).__name__}); restoring the last checkpoint")

    def on_finish(self, run: Any, result: unlocked.RunResult) -> None:
        accuracy, step = self.best
        print(f"best eval/accuracy {accuracy:.4f} at step {step} of {result.step}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        config = unlocked.load_config(CONFIG, overrides=args.overrides)
    except unlocked.UserError as err:  # a mistake in the config: one message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = unlocked.run(config, callbacks=[BestAccuracy()])
    print(f"final eval/accuracy {result.metrics['eval/accuracy']:.4f}")
    print(f"MLflow run {result.mlflow_run_id} in {result.tracking_uri}")
    print(f"checkpoints in {result.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
