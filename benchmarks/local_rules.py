"""Every backprop-free rule the project hosts, on one network family, one dataset, one budget.

    python -m benchmarks.local_rules [--quick]

Two tables, each run through the project's Controller on one local Ray (tracking off),
every run seeing the same number of training examples (``--epochs`` passes):

* **MLP on ``teacher``** (Gaussian inputs labelled by a fixed deep tanh network, 10
  classes): the same MLP (ReLU, no normalisation, as Forward-Forward needs; one hidden
  layer per block), Adam at one learning rate for every gradient rule. Rows: end-to-end
  backprop (one worker, every core as torch threads), the pipeline with linear heads,
  AugLocal heads, MAN (momentum auxiliary network on linear heads), Mono-Forward and
  Forward-Forward, NoProp-DT (T denoising blocks, one per worker, sharing the cores; its
  table branch is a 2-layer MLP of the same width) and MeZO (zeroth-order SPSA, on a
  smaller MLP, 1x64 tanh, as its example: one random direction per update moves a few
  thousand weights usefully in this example budget, not a quarter million; data-parallel
  on every core).
* **ResNet on ``digits-images``** (the built-in 1x8x8 handwritten digits): the CIFAR-style
  ResNet of the AugLocal benchmark, SGD with momentum; backprop, linear heads, AugLocal,
  MAN and Mono-Forward; NoProp-DT with the paper's own small CNN per block.
  Forward-Forward here is MLP-only (the rule's goodness needs plain layers; its
  convolutional variant is not built), so it has no ResNet row.

Columns: held-out accuracy, throughput (samples/s over every step but the first) and peak
training memory per worker (the largest of a run's workers). Last line: one JSON object
mapping each rule's name to ``{"acc", "samples_per_s", "peak_mb"}`` for the MLP table, with
``bp_acc``, and the ResNet table the same way under ``"resnet"``.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from typing import Any

import ray

from benchmarks.auglocal import steps_for
from benchmarks.pipeline import CORES, measure
from benchmarks.report import json_line

PAPERS = {
    "backprop": "(baseline)",
    "linear": "greedy local heads: the weakest local baseline (AugLocal, Table 1)",
    "auglocal": "AugLocal (ICLR 2024): comparable to backprop, ~40 % less GPU memory",
    "man": "MAN (ECCV 2024): beats local baselines; >45 % GPU memory saved on ImageNet vs BP",
    "mono_forward": "Mono-Forward v2 (arXiv:2501.09238): beats vanilla FF; v1 claimed >= BP",
    "forward_forward": "FF (Hinton 2022): 1.36 % MNIST test error, 4x2000 MLP (secondary)",
    "noprop": "NoProp-DT (arXiv:2503.24322): MNIST 99.54 %, CIFAR-10 80.54 % (secondary)",
    "mezo": "MeZO (NeurIPS 2023): within 1 % of fine-tuning on 7/11 tasks, OPT-13B",
}


@dataclass(frozen=True)
class Run:
    key: str
    label: str
    strategy: dict[str, Any]
    model: dict[str, Any]
    cpus: float


def run_config(run: Run, data: dict[str, Any], steps: int, root: str) -> dict[str, Any]:
    return {
        "run": {"name": f"bench-rules-{run.key}", "seed": 0},
        "strategy": run.strategy,
        "model": run.model,
        "data": data,
        "resources": {"cpus_per_worker": run.cpus},
        "tracking": {"enabled": False},
        "checkpoint": {"root": f"{root}/ckpt", "every": 10_000},
        "stop": {"max_steps": steps},
        "eval": {"every": 10_000},
    }


def gradient_runs(
    model: dict[str, Any], common: dict[str, Any], blocks: int, forward_forward: bool
) -> list[Run]:
    """Backprop and the pipeline's rules on ``model`` cut into ``blocks`` blocks."""

    def pipeline(**rule: Any) -> dict[str, Any]:
        return {"kind": "pipeline", "blocks": blocks, "max_in_flight": 2 * blocks, **common, **rule}

    runs = [
        Run("backprop", f"backprop, {CORES} threads", {"kind": "backprop", **common}, model, CORES),
        Run("linear", "linear heads", pipeline(aux_head="linear"), model, 1),
        Run("auglocal", "AugLocal", pipeline(aux_head="augmented"), model, 1),
        Run("man", "MAN (linear heads)", pipeline(aux_head="linear", momentum_aux={}), model, 1),
        Run("mono_forward", "Mono-Forward", pipeline(local_rule="mono_forward"), model, 1),
    ]
    if forward_forward:
        runs.append(
            Run(
                "forward_forward",
                "Forward-Forward",
                pipeline(local_rule="forward_forward"),
                model,
                1,
            )
        )
    return runs


def noprop_run(args: argparse.Namespace) -> Run:
    """NoProp-DT's T blocks, one worker each sharing the cores, each block seeing the run's
    examples; its table branch is a 2-layer MLP of the same width, its image branch the
    paper's CNN."""
    strategy = {
        "kind": "noprop",
        "blocks": args.noprop_blocks,
        "batches_per_step": args.batches_per_step,
    }
    model = {"kind": "mlp", "hidden": [args.width] * 2}
    cpus = max(0.1, CORES / args.noprop_blocks)
    return Run("noprop", f"NoProp-DT, T={args.noprop_blocks}", strategy, model, cpus)


def mlp_runs(args: argparse.Namespace) -> list[Run]:
    model = {"kind": "mlp", "hidden": [args.width] * args.layers, "norm": "none"}
    common = {
        "batches_per_step": args.batches_per_step,
        "optimizer": {"kind": "adam", "lr": args.lr},
    }
    runs = gradient_runs(model, common, args.layers, forward_forward=True)
    runs[-1] = Run(
        runs[-1].key,
        runs[-1].label,
        {**runs[-1].strategy, "optimizer": {"kind": "adam", "lr": args.ff_lr}},
        model,
        1,
    )
    mezo = {
        "kind": "zo",
        "lr": args.mezo_lr,
        "eps": 1e-3,
        "workers": CORES,
        "batches_per_step": args.batches_per_step,
    }
    small = {"kind": "mlp", "hidden": [64], "activation": "tanh", "norm": "none"}
    runs.append(Run("mezo", "MeZO, MLP 1x64 (smaller)", mezo, small, 1))
    runs.append(noprop_run(args))
    return runs


def resnet_runs(args: argparse.Namespace) -> list[Run]:
    model = {"kind": "resnet", "depth": args.depth, "width": args.resnet_width}
    common = {
        "batches_per_step": args.batches_per_step,
        "optimizer": {"kind": "sgd", "lr": args.resnet_lr, "momentum": 0.9, "weight_decay": 5e-4},
    }
    return [*gradient_runs(model, common, 4, forward_forward=False), noprop_run(args)]


def measure_all(
    runs: list[Run], data: dict[str, Any], epochs: float, batches_per_step: int, root: str
) -> dict[str, dict[str, Any]]:
    steps = steps_for(data, epochs, batches_per_step)
    return {run.key: measure(run.label, run_config(run, data, steps, root)) for run in runs}


def table(title: str, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print one table against its backprop row; its JSON part."""
    base = rows["backprop"]
    print(f"\n{title}")
    print(
        f"{'rule':<16} {'acc':>7} {'vs BP':>7} {'samples/s':>10} {'vs BP':>6} "
        f"{'MB/worker':>9} {'vs BP':>6}  paper"
    )
    for key, row in rows.items():
        print(
            f"{key:<16} {row['accuracy']:7.4f} {row['accuracy'] - base['accuracy']:+7.4f} "
            f"{row['samples_per_s']:10.0f} {row['samples_per_s'] / base['samples_per_s']:6.2f} "
            f"{row['peak_mb_per_worker']:9.1f} "
            f"{row['peak_mb_per_worker'] / base['peak_mb_per_worker']:6.2f}  {PAPERS[key]}"
        )
    figures: dict[str, Any] = {
        key: {
            "acc": row["accuracy"],
            "samples_per_s": row["samples_per_s"],
            "peak_mb": row["peak_mb_per_worker"],
        }
        for key, row in rows.items()
    }
    figures["bp_acc"] = base["accuracy"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, < 4 min on 2 cores")
    parser.add_argument("--data-root", default=".unlocked/datasets")
    parser.add_argument("--size", type=int, help="teacher rows (default 50k, quick 8k)")
    parser.add_argument("--width", type=int, default=256, help="MLP hidden width")
    parser.add_argument("--layers", type=int, default=4, help="MLP hidden layers = blocks")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam, every MLP gradient rule")
    parser.add_argument("--ff-lr", type=float, default=3e-3, help="Adam, Forward-Forward")
    parser.add_argument("--epochs", type=float, help="MLP epochs (default 5, quick 1)")
    parser.add_argument("--depth", type=int, help="ResNet depth (default 20, quick 14)")
    parser.add_argument("--resnet-width", type=int, default=16)
    parser.add_argument("--resnet-lr", type=float, default=0.02, help="SGD, every ResNet rule")
    parser.add_argument("--resnet-epochs", type=float, help="default 15, quick 3")
    parser.add_argument("--mezo-lr", type=float, default=0.01, help="MeZO's SGD rate")
    parser.add_argument("--noprop-blocks", type=int, help="NoProp's T (default 10, quick 3)")
    parser.add_argument("--batches-per-step", type=int, default=10)
    args = parser.parse_args()
    args.noprop_blocks = args.noprop_blocks or (3 if args.quick else 10)
    args.size = args.size or (8_000 if args.quick else 50_000)
    args.epochs = args.epochs or (1 if args.quick else 5)
    args.depth = args.depth or (14 if args.quick else 20)
    args.resnet_epochs = args.resnet_epochs or (3 if args.quick else 15)

    teacher = {
        "dataset": "teacher",
        "size": args.size,
        "batch_size": args.batch_size,
        "root": args.data_root,
    }
    digits = {"dataset": "digits-images", "batch_size": 64, "root": args.data_root}
    ray.init(num_cpus=max(4, CORES), include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as root:
        mlp = measure_all(mlp_runs(args), teacher, args.epochs, args.batches_per_step, root)
        resnet = measure_all(
            resnet_runs(args), digits, args.resnet_epochs, args.batches_per_step, root
        )
    ray.shutdown()
    figures = table(
        f"MLP {args.layers}x{args.width} (ReLU, no norm) on teacher-{args.size}, "
        f"{args.epochs:g} epoch(s), batch {args.batch_size}, Adam lr {args.lr} "
        f"(Forward-Forward {args.ff_lr}); {CORES} cores",
        mlp,
    )
    figures["resnet"] = table(
        f"ResNet-{args.depth} width {args.resnet_width} on digits-images, "
        f"{args.resnet_epochs:g} epochs, batch 64, SGD lr {args.resnet_lr}; {CORES} cores",
        resnet,
    )
    figures["quick"] = args.quick
    print(json_line(figures))


if __name__ == "__main__":
    main()
