"""`unlocked` (or `python -m orchestrator`): run, resume, validate, list; submit to a cluster.

Every way a command ends is one message and an exit code, the traceback only under
`--verbose`: a user's mistake (a bad config, a missing dataset, an unreachable cluster,
also one raised inside a Ray worker) exits 2; a spent failure budget exits 1 naming the
failures and the last checkpoint; Ctrl-C exits 130 and SIGTERM 143; anything else is a
bug and exits 1. A run that ends early prints the command that continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestrator.callbacks import Callback
from orchestrator.errors import RunFailed, Terminated, UserError
from orchestrator.progress import LOG_FORMAT
from strategies.config import StrategyConfig

if TYPE_CHECKING:
    from orchestrator.checkpoint import CheckpointStore
    from orchestrator.config import RunConfig
    from orchestrator.controller import ActiveRun
    from orchestrator.results import RunResult
    from strategies.base import Metrics

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
                nargs="?",
                const=True,
                default=False,
                metavar="ATTEMPT",
                help="continue this run (run.name) from its newest complete checkpoint: of "
                "the attempt folder ATTEMPT (the last part of the 'checkpoints:' path a run "
                "prints), or else of the newest attempt that holds one",
            )
            sub.add_argument(
                "--replay-schedule",
                metavar="FILE",
                help="train the single run a PBT schedule file describes (pbt/winner_schedule"
                ".yaml), switching hyperparameters at its steps; takes the place of CONFIG",
            )
    _job_commands(commands, common)
    upload = commands.add_parser(
        "tracking-upload",
        help="send the MLflow records a run kept while its tracking server was down",
        parents=[common],
    )
    upload.add_argument("buffer", metavar="DIR", help="the folder the run's message named")
    upload.add_argument(
        "--uri",
        metavar="URI",
        help="the tracking server or store to send them to; default: the run's own",
    )
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
    command.add_argument(
        "--set-from",
        dest="override_files",
        action="append",
        default=[],
        metavar="FILE",
        help="overrides from a file: a YAML list of KEY.PATH=VALUE strings, applied before "
        "any --set (read, never passed through a shell)",
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


def cmd_tracking_upload(path: str, uri: str | None) -> int:
    from orchestrator.tracking_buffer import upload

    sent = upload(path, uri)
    print(f"{path}: {sent} MLflow records sent")
    return 0


def cmd_validate(path: str, overrides: list[str]) -> int:
    from orchestrator.cluster import probe
    from orchestrator.config import load_config
    from orchestrator.data.source import check_dataset
    from orchestrator.tracking_probe import check_tracking

    config = load_config(path, overrides)
    if config.data is not None:
        check_dataset(config.data)
    address = config.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        probe(address)
    check_tracking(config)
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


def closing_lines(result: RunResult, resume: str) -> list[str]:
    """What the end of a run prints: where its checkpoints and MLflow record are, and
    commands that work as printed: to open the UI, to fetch and replay a PBT winner's
    schedule, to continue an interrupted run (``resume``: ``RunAttempt.resume_command``)."""
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
        lines.append(f"interrupted; continue with: {resume}")
    return lines


def yaml_scalar(text: str) -> str:
    """``text`` as a ``--set`` value that reads back as this same string (``--set`` parses
    values as YAML, where ``123``, ``true`` or ``a: b`` would become something else)."""
    try:
        if text.strip() and yaml.safe_load(text) == text:  # --set reads blank as null
            return text
    except yaml.YAMLError:
        pass
    # Double-quoted, on one line (line breaks and unprintable characters escaped).
    return yaml.safe_dump(text, default_style='"', width=math.inf).removesuffix("\n")


class RunAttempt(Callback):
    """The run this command started, as far as it got: its config and checkpoints, seen
    through the callbacks, so that a run ending early (a signal, a spent failure budget)
    prints the command that continues this very run.

    The command repeats the config argument and every ``--set`` as given, then pins what
    locates the run's checkpoints, in case it came from elsewhere: ``run.name`` (by
    default the config file's name) and ``checkpoint.root`` when
    ``$UNLOCKED_CHECKPOINT_ROOT`` chose it (another shell may not have it)."""

    def __init__(
        self,
        source: list[str],
        overrides: list[str],
        resumed: bool | str,
        config: RunConfig | None,
    ) -> None:
        self.source = source
        self.overrides = overrides
        self.resumed = resumed
        self.config = config
        self.store: CheckpointStore | None = None
        self.written: tuple[int, str] | None = None

    def on_step_end(self, run: ActiveRun, step: int, metrics: Metrics) -> None:
        self.config, self.store = run.config, run.store

    def on_checkpoint(self, run: ActiveRun, step: int, path: str) -> None:
        self.config, self.store = run.config, run.store
        self.written = (step, path)

    def on_failure(self, run: ActiveRun, error: BaseException, failures: int) -> None:
        self.config, self.store = run.config, run.store

    def on_finish(self, run: ActiveRun, result: RunResult) -> None:
        self.config, self.store = run.config, run.store  # stopped before a step ended

    def latest(self) -> tuple[int, str] | None:
        """(step, path) of the newest complete checkpoint this run has: written by it, or
        (before it wrote one) the one it resumed from."""
        if self.written is not None or self.store is None:
            return self.written
        try:
            resumed = self.store.latest()
        except (OSError, UserError):  # storage gone: say nothing rather than fail here
            return None
        return (resumed.step, resumed.path) if resumed is not None else None

    def resume_command(self) -> str:
        from orchestrator.locations import CHECKPOINT_ROOT_ENV

        pins = {}
        if self.config is not None:
            pins["run.name"] = self.config.run_name
            if os.environ.get(CHECKPOINT_ROOT_ENV):
                pins["checkpoint.root"] = self.config.checkpoint.root
        given = {o.partition("=")[0].strip() for o in self.overrides}
        overrides = self.overrides + [
            f"{key}={yaml_scalar(value)}" for key, value in pins.items() if key not in given
        ]
        words = [*self.source, *(w for o in overrides for w in ("--set", o)), "--resume"]
        attempt = self.attempt()
        if attempt is not None:
            words.append(attempt)
        return f"{_unlocked()} run " + " ".join(map(shlex.quote, words))

    def attempt(self) -> str | None:
        """The attempt folder this run writes (or resumed), which ``--resume`` pins: the
        newest attempt of the name may be another run by the time the command is used."""
        if self.store is not None:
            return self.store.uri.rstrip("/").rsplit("/", 1)[-1]
        return self.resumed if isinstance(self.resumed, str) else None

    def continuation(self) -> list[str]:
        """After a run stopped early: its newest checkpoint and how to continue from it."""
        latest = self.latest()
        if latest is not None:
            return [
                f"last checkpoint: step {latest[0]} in {latest[1]}",
                f"continue with: {self.resume_command()}",
            ]
        if self.resumed:
            return [f"continue with: {self.resume_command()}"]
        return ["no checkpoint was written; run it again without --resume"]


def cmd_run(attempt: RunAttempt, replay: str | None) -> int:
    import unlocked

    if replay is not None:
        result = unlocked.run(
            replay_schedule=replay,
            overrides=attempt.overrides,
            resume=attempt.resumed,
            callbacks=[attempt],
        )
    else:
        attempt.config = unlocked.load_config(attempt.source[0], attempt.overrides)
        result = unlocked.run(attempt.config, resume=attempt.resumed, callbacks=[attempt])
    print("\n".join(closing_lines(result, attempt.resume_command())))
    if result.stopped_by.startswith("SIG"):
        return 128 + signal.Signals[result.stopped_by].value
    return 0


class _UnhandledRemoteErrors(logging.Filter):
    """Ray logs, with its remote stack, every failed task whose result nobody fetched: the
    other batches in flight on a worker after its first error. That error is already the
    command's one message; these repeat it. Shown under --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unhandled error")


_UNHANDLED_REMOTE_ERRORS = _UnhandledRemoteErrors()


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
    ray_worker = logging.getLogger("ray._private.worker")
    if verbose:
        ray_worker.removeFilter(_UNHANDLED_REMOTE_ERRORS)
    else:
        ray_worker.addFilter(_UNHANDLED_REMOTE_ERRORS)
    logging.captureWarnings(True)  # warnings.warn lines in the same format


def remote_cause(err: BaseException) -> BaseException:
    """The exception a Ray task or actor method raised, out of the ``RayTaskError`` (with
    the remote stack in its message) that ``ray.get`` raises in its place."""
    exceptions = sys.modules.get("ray.exceptions")  # without Ray imported, nothing is remote
    while exceptions is not None and isinstance(err, exceptions.RayTaskError):
        if err.cause is None or err.cause is err:
            break
        err = err.cause
    return err


def ending(
    err: BaseException, attempt: RunAttempt | None, verbose: bool = False
) -> tuple[list[str], int]:
    """What a command that raised ``err`` prints (after its traceback, if ``verbose``),
    and its exit code."""
    if isinstance(err, KeyboardInterrupt):
        code = 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
        lines = [f"stopped by {signal.Signals(code - 128).name}"]
        if attempt is not None and (attempt.store is not None or attempt.resumed):
            lines += attempt.continuation()
        return lines, code
    if isinstance(err, RunFailed):
        # The first line names the failures; the rest is the last lost worker's record.
        failures = str(err).partition("\n")[0]
        more = attempt.continuation() if attempt is not None and err.resumable else []
        return [f"error: {failures}", *more], 1
    cause = remote_cause(err)
    if isinstance(cause, UserError):
        more = attempt.continuation() if attempt is not None and cause.resumable else []
        return [f"error: {cause}", *more], 2
    where = " in a Ray worker" if cause is not err else ""
    lines = [f"error: internal error{where}: {type(cause).__name__}: {cause}"]
    return lines + ([] if verbose else ["(rerun with --verbose for the traceback)"]), 1


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` while the command runs, so that ``finally`` blocks run
    (a dataset's staging folder is removed) and the command ends as Ctrl-C does. While a
    run trains, the controller's handler takes its place: finish the step, checkpoint, stop."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main called from a notebook's thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace, attempt: RunAttempt | None) -> int:
    if args.command == "strategies":
        return cmd_strategies()
    if args.command == "datasets":
        return cmd_datasets()
    if args.command == "submit":
        return cmd_submit(args)
    if args.command in ("status", "logs", "stop"):
        return cmd_job(args)
    if args.command == "tracking-upload":
        return cmd_tracking_upload(args.buffer, args.uri)
    if args.command == "validate":
        return cmd_validate(args.config, args.overrides)
    if attempt is None:
        raise UserError(
            "unlocked run: give a CONFIG file, or --replay-schedule FILE (which holds its own "
            "config), not both and not neither"
        )
    return cmd_run(attempt, args.replay_schedule)


def _attempt(args: argparse.Namespace) -> RunAttempt | None:
    """The run ``unlocked run`` starts, if its arguments name exactly one config."""
    if args.command != "run" or (args.config is None) == (args.replay_schedule is None):
        return None
    source = [args.config] if args.config else ["--replay-schedule", args.replay_schedule]
    return RunAttempt(source, args.overrides, args.resume, None)


def _config_after_resume(args: argparse.Namespace) -> None:
    """``run --resume FILE`` (the option before the config): ``--resume`` takes an optional
    attempt, so argparse gave it the config; an existing file is the config, and the run
    resumes its newest attempt."""
    if (
        args.command == "run"
        and args.config is None
        and args.replay_schedule is None
        and isinstance(args.resume, str)
        and Path(args.resume).is_file()
    ):
        args.config, args.resume = args.resume, True


def _all_overrides(args: argparse.Namespace) -> list[str]:
    """``--set-from`` files first, in order, then ``--set``: the command line wins. Expanded
    here, so a resume hint repeats them as ordinary ``--set`` words."""
    from orchestrator.config import read_override_file

    return [*(o for f in args.override_files for o in read_override_file(f)), *args.overrides]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _config_after_resume(args)
    configure_logging(args.verbose)
    attempt = None
    with sigterm_raises():
        try:
            if hasattr(args, "overrides"):  # commands that take a config
                args.overrides = _all_overrides(args)
            attempt = _attempt(args)
            return _dispatch(args, attempt)
        except (Exception, KeyboardInterrupt) as err:
            if args.verbose:
                traceback.print_exception(type(err), err, err.__traceback__)
            lines, code = ending(err, attempt, args.verbose)
            print("\n".join(lines), file=sys.stderr)
            return code


if __name__ == "__main__":
    sys.exit(main())
