"""`unlocked` (or `python -m orchestrator`): run, resume, validate, list; submit to a cluster.

User mistakes (a bad config, a missing dataset, an unreachable cluster) print one
message and exit 2 without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal, get_args, get_origin

from pydantic import BaseModel

from orchestrator.errors import UserError

if TYPE_CHECKING:
    pass

log = logging.getLogger("unlocked")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlocked", description="Train networks without one global backward pass."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "train from a YAML config"), ("validate", "check a config")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "config", nargs="?" if name == "run" else None, help="path of the YAML run config"
        )
        _add_overrides(sub)
        if name == "run":
            sub.add_argument(
                "--resume",
                action="store_true",
                help="continue this run (run.name) from its newest complete checkpoint",
            )
            sub.add_argument(
                "--replay-schedule",
                metavar="FILE",
                help="train the single run a PBT schedule file describes (pbt/winner_schedule"
                ".yaml), switching hyperparameters at its steps; takes the place of CONFIG",
            )
    _job_commands(commands)
    commands.add_parser("strategies", help="list the registered strategies and their options")
    commands.add_parser("datasets", help="list the built-in datasets")
    return parser


def _add_overrides(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. --set stop.max_steps=50 (repeatable)",
    )


def _job_commands(commands: argparse._SubParsersAction) -> None:
    """submit / status / logs / stop: a run on a Ray cluster, through Ray's Job SDK."""
    address = {
        "metavar": "URL",
        "help": "the Ray dashboard, e.g. http://HEAD:8265; default: $RAY_ADDRESS",
    }
    submit = commands.add_parser("submit", help="check a config, then run it as a Ray job")
    submit.add_argument("config", help="path of the YAML run config, inside the working dir")
    submit.add_argument("--address", **address)
    _add_overrides(submit)
    submit.add_argument(
        "--runtime-env",
        metavar="FILE",
        help="the job's runtime environment (YAML); default: deploy/runtime_env.yaml",
    )
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the job, added to the runtime env's (repeatable)",
    )
    submit.add_argument("--submission-id", help="the job's id; default: one Ray picks")
    submit.add_argument(
        "--no-wait", action="store_true", help="return once submitted instead of following logs"
    )
    for name, text in (
        ("status", "a submitted job's status"),
        ("logs", "a submitted job's logs"),
        ("stop", "stop a submitted job"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job_id", help="the id `unlocked submit` printed")
        sub.add_argument("--address", **address)
        if name == "logs":
            sub.add_argument(
                "-f", "--follow", action="store_true", help="stream until the job ends"
            )


def _alternatives(annotation: object) -> list[str]:
    """The ``kind`` of each model a discriminated-union field accepts."""
    args = get_args(annotation)
    if args and get_origin(annotation) is Annotated:
        args = get_args(args[0])
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return [str(m.model_fields["kind"].default) for m in models if "kind" in m.model_fields]


def _describe(config: BaseModel, indent: str = "    ", top: bool = True) -> list[str]:
    """Each option with its default, its allowed values and its description."""
    lines = []
    for name, info in type(config).model_fields.items():
        if top and name == "kind":
            continue
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            kinds = _alternatives(info.annotation)
            choice = f" (kind: {' | '.join(kinds)}; defaults below)" if len(kinds) > 1 else ""
            lines.append(f"{indent}{name}:{choice}")
            lines.extend(_describe(value, indent + "  ", top=False))
            continue
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
        allowed = f" ({' | '.join(map(str, choices))})" if choices else ""
        text = f" - {info.description}" if info.description else ""
        lines.append(f"{indent}{name} = {value!r}{allowed}{text}")
    return lines


def cmd_strategies() -> int:
    from strategies.registry import strategy_configs

    for kind, config in strategy_configs().items():
        summary = (config.__doc__ or "").strip()
        print(f"{kind}: {summary.splitlines()[0] if summary else ''}")
        print("\n".join(_describe(config())))
    return 0


def cmd_datasets() -> int:
    from orchestrator.data.builtin import BUILTIN_DATASETS

    for name, dataset in BUILTIN_DATASETS.items():
        print(f"{name}: {dataset.description}")
    return 0


def cmd_validate(path: str, overrides: list[str]) -> int:
    from orchestrator.cluster import probe
    from orchestrator.config import load_config
    from orchestrator.data.source import check_dataset

    config = load_config(path, overrides)
    if config.data is not None:
        check_dataset(config.data)
    address = config.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        probe(address)
    print(
        f"{path}: valid. run {config.run_name!r}, strategy {config.strategy.kind} with "
        f"{config.strategy.summary()} x {config.resources.cpus_per_worker} CPU, "
        f"{config.stop.max_steps} steps"
    )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator import jobs

    address, job_id = jobs.submit(
        args.config,
        args.overrides,
        args.address,
        args.runtime_env,
        args.env,
        args.submission_id,
    )
    print(f"submitted job {job_id} to {address}")
    if args.no_wait:
        print(f"follow it: unlocked logs {job_id} --follow --address {address}")
        print(f"stop it:   unlocked stop {job_id} --address {address}")
        return 0
    final = jobs.follow(job_id, address)
    print(f"job {job_id}: {final}")
    return jobs.EXIT_CODES.get(final, 1)


def cmd_job(args: argparse.Namespace) -> int:
    from orchestrator import jobs

    if args.command == "status":
        info = jobs.status(args.job_id, args.address)
        print(f"job {args.job_id}: {info['status']}")
        print(f"  entrypoint: {info['entrypoint']}")
        if info["message"]:
            print(f"  message: {info['message']}")
        return 0
    if args.command == "logs":
        if args.follow:
            final = jobs.follow(args.job_id, args.address)
            print(f"job {args.job_id}: {final}")
            return jobs.EXIT_CODES.get(final, 1)
        sys.stdout.write(jobs.logs(args.job_id, args.address))
        return 0
    stopped = jobs.stop(args.job_id, args.address)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def cmd_run(path: str | None, overrides: list[str], resume: bool, replay: str | None) -> int:
    import unlocked

    if (path is None) == (replay is None):
        raise UserError(
            "unlocked run: give a CONFIG file, or --replay-schedule FILE (which holds its own "
            "config), not both and not neither"
        )
    if replay is not None:
        result = unlocked.run(replay_schedule=replay, overrides=overrides, resume=resume)
        path = replay
    else:
        result = unlocked.run(unlocked.load_config(path, overrides), resume=resume)
    shown = " ".join(
        f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()) if k.startswith("eval/")
    )
    print(f"run {result.run_name!r} stopped at step {result.step} ({result.stopped_by}). {shown}")
    print(f"checkpoints: {result.checkpoint_dir}")
    if result.mlflow_run_id:
        print(f"MLflow run {result.mlflow_run_id} in {result.tracking_uri}")
        if not result.tracking_uri.startswith("http"):
            print(
                f"open the UI: mlflow ui --backend-store-uri {result.tracking_uri} "
                "--host 127.0.0.1 --port 5000"
            )
        print(f"then browse {result.ui_url}")
    if result.stopped_by.startswith("SIG"):
        again = f"--replay-schedule {replay}" if replay else path
        print(f"interrupted; continue with: unlocked run {again} --resume")
        return 128 + signal.Signals[result.stopped_by].value
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "strategies":
            return cmd_strategies()
        if args.command == "datasets":
            return cmd_datasets()
        if args.command == "submit":
            return cmd_submit(args)
        if args.command in ("status", "logs", "stop"):
            return cmd_job(args)
        if args.command == "validate":
            return cmd_validate(args.config, args.overrides)
        return cmd_run(args.config, args.overrides, args.resume, args.replay_schedule)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
