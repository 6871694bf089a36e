"""`unlocked` (or `python -m orchestrator`): run, resume, validate, list; submit to a cluster.

User mistakes (a bad config, a missing dataset, an unreachable cluster) print one
message and exit 2 without a traceback; anything else is a bug: one message and exit 1,
with its traceback under `--verbose`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestrator.errors import RunFailed, UserError
from orchestrator.progress import LOG_FORMAT
from strategies.config import StrategyConfig

if TYPE_CHECKING:
    from orchestrator.results import RunResult

log = logging.getLogger("unlocked")

OUR_LOGGERS = ("unlocked", "orchestrator", "strategies", "workers")
WINNER_SCHEDULE = "pbt/winner_schedule.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlocked", description="Train networks without one global backward pass."
    )
    verbose = {
        "action": "store_true",
        "help": "show the libraries' log lines (Ray, MLflow, ...) down to INFO, and the "
        "traceback of an error that is not a mistake in what you gave",
    }
    parser.add_argument("-v", "--verbose", **verbose)
    # Also after the command (`unlocked run X --verbose`); unset there, the global one holds.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", default=argparse.SUPPRESS, **verbose)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "train from a YAML config"), ("validate", "check a config")):
        sub = commands.add_parser(name, help=text, parents=[common])
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
    _job_commands(commands, common)
    commands.add_parser(
        "strategies", help="list the registered strategies and their options", parents=[common]
    )
    commands.add_parser("datasets", help="list the built-in datasets", parents=[common])
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


def _job_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """submit / status / logs / stop: a run on a Ray cluster, through Ray's Job SDK."""
    address = {
        "metavar": "URL",
        "help": "the Ray dashboard, e.g. http://HEAD:8265; default: $RAY_ADDRESS",
    }
    submit = commands.add_parser(
        "submit", help="check a config, then run it as a Ray job", parents=[common]
    )
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
        sub = commands.add_parser(name, help=text, parents=[common])
        sub.add_argument("job_id", help="the id `unlocked submit` printed")
        sub.add_argument("--address", **address)
        if name == "logs":
            sub.add_argument(
                "-f", "--follow", action="store_true", help="stream until the job ends"
            )


def _sections(annotation: object) -> list[type[BaseModel]]:
    """The config sections a field's type holds: the section itself, a union's members, a
    list's items or a dict's values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _sections(arg)]


def _allowed(info: FieldInfo) -> str:
    """A field's allowed values: a Literal's options, or a number's or a list's bounds."""
    if get_origin(info.annotation) is Literal:
        return " | ".join(map(str, get_args(info.annotation)))
    bounds = []
    for rule in info.metadata:
        if isinstance(rule, annotated_types.Gt):
            bounds.append(f"> {rule.gt}")
        elif isinstance(rule, annotated_types.Ge):
            bounds.append(f">= {rule.ge}")
        elif isinstance(rule, annotated_types.Lt):
            bounds.append(f"< {rule.lt}")
        elif isinstance(rule, annotated_types.Le):
            bounds.append(f"<= {rule.le}")
        elif isinstance(rule, annotated_types.MinLen) and rule.min_length:
            bounds.append(f"len >= {rule.min_length}")
    return ", ".join(bounds)


def _summary(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip().split("\n\n")[0].replace("\n    ", " ")


def _describe(
    section: type[BaseModel],
    values: BaseModel | None,
    strategies: list[str],
    indent: str = "    ",
    show_kind: bool = True,
) -> list[str]:
    """Each option of ``section`` with its default (from ``values``, else the class), its
    allowed values and its description; a section chosen by ``kind`` (an EGGROLL task, a
    PDE problem) with every kind's options; ``strategies``: what a strategy-valued
    option (PBT's ``inner``) accepts."""
    lines = []
    for name, info in section.model_fields.items():
        if name == "kind" and not show_kind:
            continue
        if values is not None:
            value = values.__dict__[name]
        else:
            value = info.get_default(call_default_factory=True)
        text = f" - {info.description}" if info.description else ""
        held = _sections(info.annotation)
        if info.annotation is StrategyConfig:
            kinds = " | ".join(strategies)
            lines.append(
                f"{indent}{name} = {{kind: {value.kind}}} (any other strategy: {kinds}; "
                f"with the options listed under its kind){text}"
            )
        elif isinstance(value, BaseModel) and len(held) > 1:
            lines.append(
                f"{indent}{name}: {info.description or ''} One of {len(held)} kinds, "
                f"chosen by {name}.kind:"
            )
            for kind in held:
                default = " (the default)" if isinstance(value, kind) else ""
                tag = kind.model_fields["kind"].default
                lines.append(f"{indent}  kind: {tag}{default} - {_summary(kind)}")
                shown = value if isinstance(value, kind) else kind()
                lines.extend(_describe(kind, shown, strategies, indent + "    ", False))
        elif isinstance(value, BaseModel):
            lines.append(f"{indent}{name}: {info.description or ''}".rstrip())
            lines.extend(_describe(type(value), value, strategies, indent + "  "))
        else:
            allowed = f" ({_allowed(info)})" if _allowed(info) else ""
            lines.append(f"{indent}{name} = {value!r}{allowed}{text}")
            for item in held:  # sections inside a list or a dict (PBT's search space)
                lines.append(f"{indent}  each value: {_summary(item)}")
                lines.extend(_describe(item, None, strategies, indent + "    "))
    return lines


def cmd_strategies() -> int:
    from strategies.registry import strategy_configs

    configs = strategy_configs()
    for kind, config in configs.items():
        print(f"{kind}: {_summary(config)}")
        others = [other for other in configs if other != kind]
        print("\n".join(_describe(config, config(), others, show_kind=False)))
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
        print(f"follow it: {_unlocked()} logs {job_id} --follow --address {address}")
        print(f"stop it:   {_unlocked()} stop {job_id} --address {address}")
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


def _python() -> str:
    """This interpreter as it was started (a virtualenv's, not the one it links to), so a
    printed command runs as printed with no virtualenv active."""
    return shlex.quote(sys.executable)


def _unlocked() -> str:
    """How this shell starts unlocked again: ``unlocked`` where that name finds this
    installation, else the full path of its script (or ``python -m orchestrator``)."""
    script = Path(sys.executable).parent / "unlocked"
    if not script.is_file():
        return f"{_python()} -m orchestrator"
    found = shutil.which("unlocked")
    if found is not None and Path(found).resolve() == script.resolve():
        return "unlocked"
    return shlex.quote(str(script))


def closing_lines(result: RunResult, rerun: str) -> list[str]:
    """What the end of a run prints: where its checkpoints and MLflow record are, and
    commands that work as printed: to open the UI, to fetch and replay a PBT winner's
    schedule, to resume an interrupted run (``rerun``: the config argument of this run)."""
    shown = " ".join(
        f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()) if k.startswith("eval/")
    )
    lines = [
        f"run {result.run_name!r} stopped at step {result.step} ({result.stopped_by}). {shown}",
        f"checkpoints: {result.checkpoint_dir}",
    ]
    uri = result.tracking_uri or ""
    if result.mlflow_run_id:
        lines.append(f"MLflow run {result.mlflow_run_id} in {uri}")
        if not uri.startswith(("http://", "https://")):
            lines.append(
                f"open the UI: {_python()} -m mlflow ui --backend-store-uri {shlex.quote(uri)} "
                "--host 127.0.0.1 --port 5000"
            )
        lines.append(f"then browse {result.ui_url}")
    if result.mlflow_run_id and WINNER_SCHEDULE in result.artifacts:
        lines += [
            f"the winner's schedule is {WINNER_SCHEDULE} in that run; fetch it, then train "
            "it as one run:",
            f"  MLFLOW_TRACKING_URI={shlex.quote(uri)} {_python()} -m mlflow artifacts download "
            f"--run-id {result.mlflow_run_id} --artifact-path {WINNER_SCHEDULE} --dst-path .",
            f"  {_unlocked()} run --replay-schedule {Path(WINNER_SCHEDULE).name}",
        ]
    if result.stopped_by.startswith("SIG"):
        lines.append(f"interrupted; continue with: {_unlocked()} run {rerun} --resume")
    return lines


def cmd_run(path: str | None, overrides: list[str], resume: bool, replay: str | None) -> int:
    import unlocked

    if (path is None) == (replay is None):
        raise UserError(
            "unlocked run: give a CONFIG file, or --replay-schedule FILE (which holds its own "
            "config), not both and not neither"
        )
    if replay is not None:
        result = unlocked.run(replay_schedule=replay, overrides=overrides, resume=resume)
        rerun = f"--replay-schedule {shlex.quote(replay)}"
    else:
        assert path is not None
        result = unlocked.run(unlocked.load_config(path, overrides), resume=resume)
        rerun = shlex.quote(path)
    print("\n".join(closing_lines(result, rerun)))
    if result.stopped_by.startswith("SIG"):
        return 128 + signal.Signals[result.stopped_by].value
    return 0


def configure_logging(verbose: bool) -> None:
    """One format for every log line; the libraries' (Ray, MLflow, alembic, urllib3, ...)
    at WARNING unless ``verbose``. The root logger's level is theirs, ours are at INFO."""
    # MLflow gives its loggers a handler and format of its own at import, unless told not
    # to; told, its lines reach the root handler below like every other library's.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    logging.basicConfig(format=LOG_FORMAT)  # a no-op where a handler exists (pytest)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    # Where MLflow was imported first (as in tests) its own handler holds: set its level.
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)
    # MLflow's own choice, even when verbose: one line per schema migration is no news.
    for name in ("alembic", "sqlalchemy.engine"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn lines in the same format


def _dispatch(args: argparse.Namespace) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return _dispatch(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.verbose:
            raise
        what = "" if isinstance(err, RunFailed) else f"internal error: {type(err).__name__}: "
        print(f"error: {what}{err}", file=sys.stderr)
        print("(rerun with --verbose for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
