"""Bad inputs and open ports: the chaos benchmark's "nobody in, every mistake a message".

``bad_inputs`` feeds the CLI (in this process, as ``unlocked validate`` / ``unlocked run``)
a list of inputs a user or an attacker could give: the ones issue 17 found getting through
(infinite learning rates, NaN features, a YAML bomb, a ``!!python`` tag, ...) and seeded
mutations of the example configs that are invalid by construction (an unknown key, a
non-finite number, a section replaced by a scalar). An input is rejected cleanly when the
command exits 2 with one ``error:`` message that names where the problem is, and no
traceback.

``public_listeners_during_run`` starts a real ``unlocked run`` (embedded Ray) and counts
its listening sockets that another machine could reach.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
MUTATIONS_FULL = 130
MUTATIONS_QUICK = 30
MAX_MESSAGE = 20_000
"""Characters an error may print: a YAML bomb once printed 2 GB."""

KeyPath = tuple[Any, ...]


@dataclass(frozen=True)
class BadInput:
    """Command-line words after ``unlocked``, and what the one error must mention (a field,
    a file, a ``--set`` item: any of ``names``)."""

    label: str
    argv: tuple[str, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    label: str
    code: int
    problem: str | None
    """Why the input was not rejected cleanly; None when it was."""

    @property
    def clean(self) -> bool:
        return self.problem is None


def judge(code: int, stderr: str, names: Sequence[str]) -> str | None:
    """None when the command exited 2 with one ``error:`` message naming one of ``names``
    and no traceback; otherwise what was wrong."""
    if "Traceback" in stderr or 'File "' in stderr:
        return "printed a traceback"
    if code != 2:
        return f"exit code {code}, not 2" + (" (accepted)" if code == 0 else "")
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if len(errors) != 1:
        return f"{len(errors)} error messages, not 1"
    if len(stderr) > MAX_MESSAGE:
        return f"{len(stderr)} characters of error text"
    if not any(name in stderr for name in names):
        return f"the message names none of {list(names)}: {stderr[:400]!r}"
    return None


@contextlib.contextmanager
def _kept_logging() -> Iterator[None]:
    """``main`` sets the log levels of a command line program; the benchmark's own stay."""
    names = ["", "mlflow", "unlocked", "alembic", "sqlalchemy.engine", "ray._private.worker"]
    levels = {name: logging.getLogger(name).level for name in names}
    if not logging.getLogger().handlers:  # bound to the real stderr, not a captured one
        logging.basicConfig()
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        logging.captureWarnings(False)


def try_input(bad: BadInput) -> Verdict:
    """Run ``unlocked ARGV`` in this process, stdout and stderr captured."""
    from orchestrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _kept_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(bad.argv))
        except SystemExit as exit_:  # argparse refusing the command line
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as escaped:  # noqa: BLE001 - anything escaping main is a finding
            return Verdict(bad.label, -1, f"main raised {type(escaped).__name__}: {escaped}")
    return Verdict(bad.label, code, judge(code, err.getvalue(), bad.names))


# -- the hand-written list ------------------------------------------------------------------

BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)


FLOW_BOMB = "{" + ", ".join(BILLION_LAUGHS.strip().splitlines()) + "}"
"""The same aliases on one line, as a ``--set`` value."""


def base_config(folder: Path) -> dict[str, Any]:
    """A small valid pipeline run, every place in ``folder`` and tracking off: the
    starting point each hand-written input damages in one place."""
    return {
        "run": {"name": "chaos-inputs", "seed": 0},
        "strategy": {
            "kind": "pipeline",
            "blocks": 2,
            "batches_per_step": 2,
            "optimizer": {"kind": "adam", "lr": 0.001},
        },
        "model": {"hidden": [32, 32]},
        "data": {"dataset": "digits", "batch_size": 32, "root": str(folder / "data")},
        "tracking": {"enabled": False},
        "checkpoint": {"root": str(folder / "ckpt")},
        "stop": {"max_steps": 2},
        "eval": {"every": 2},
    }


def _merged(raw: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(raw)
    for section, values in sections.items():
        current = merged.get(section)
        # A strategy of another kind takes none of the base one's options.
        if (
            isinstance(values, dict)
            and isinstance(current, dict)
            and values.get("kind", current.get("kind")) == current.get("kind")
        ):
            merged[section] = {**current, **values}
        else:
            merged[section] = values
    return merged


def _table(folder: Path, name: str, features: list[list[float]], labels: list[int]) -> str:
    path = folder / f"{name}.parquet"
    table = pa.table(
        {
            "x": pa.array(features, pa.list_(pa.float32(), 2)),
            "y": pa.array(labels, pa.int64()),
        }
    )
    pq.write_table(table, path)
    return str(path)


def handwritten_inputs(folder: Path) -> list[BadInput]:
    """Issue 17's items 6 and 7, each one damage to ``base_config``."""
    raw = base_config(folder)
    inputs: list[BadInput] = []

    def config(
        label: str,
        names: tuple[str, ...],
        alone: bool = False,
        command: str = "validate",
        **sections: Any,
    ) -> None:
        """``alone``: ``sections`` with tracking off, no data (EGGROLL's and MoE-HC's own)."""
        start = {"tracking": raw["tracking"], "checkpoint": raw["checkpoint"]} if alone else raw
        path = folder / f"{len(inputs):03d}.yaml"
        path.write_text(yaml.safe_dump(_merged(start, sections), allow_unicode=True))
        inputs.append(BadInput(label, (command, str(path)), names))

    def text(label: str, content: str | bytes, names: tuple[str, ...] = ()) -> None:
        path = folder / f"{len(inputs):03d}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        inputs.append(BadInput(label, ("validate", str(path)), (str(path), *names)))

    def override(label: str, item: str) -> None:
        """An item on the intact base config; its error may name the item or its key."""
        path = folder / "base.yaml"
        key = item.partition("=")[0]
        inputs.append(BadInput(label, ("validate", str(path), "--set", item), ("--set ", key)))

    (folder / "base.yaml").write_text(yaml.safe_dump(raw))
    opt = raw["strategy"]["optimizer"]
    for value in (math.inf, -math.inf, math.nan, 1e300, 0.0, -0.1):
        config(
            f"lr {value}",
            ("optimizer.lr",),
            strategy={**raw["strategy"], "optimizer": {**opt, "lr": value}},
        )
    for value in (math.inf, math.nan, 1e9):
        config(
            f"weight_decay {value}",
            ("weight_decay",),
            strategy={**raw["strategy"], "optimizer": {**opt, "weight_decay": value}},
        )
    for value in (math.inf, math.nan, -1.0, 1e300):
        config(
            f"block_lr {value}",
            ("block_lr",),
            strategy={**raw["strategy"], "block_lr": [0.001, value]},
        )
    eggroll = {"kind": "eggroll", "population": 8}
    for value in (math.inf, math.nan, 1e9):
        config(f"sigma {value}", ("sigma",), alone=True, strategy={**eggroll, "sigma": value})
    for value in (2**63, 2**64, 2**32, -1, 10**30):
        config(f"seed {value}", ("run.seed",), run={"name": "chaos-inputs", "seed": value})
    for hidden in ([10**12, 32], [32, 2**21], [0, 32], [-5, 32]):
        config(f"hidden {hidden}", ("hidden",), model={"hidden": hidden})
    for value in (10**12, 2**70, 1):
        config(f"num_classes {value}", ("num_classes",), data={**raw["data"], "num_classes": value})
    for value in (2**70, -1, "ten", math.inf):
        config(f"max_steps {value}", ("max_steps",), stop={"max_steps": value})
    config(
        "stop metric typo",
        ("stop.target.metric",),
        stop={"max_steps": 2, "target": {"metric": "eval/acuracy", "value": 0.9}},
    )
    config("unknown section", ("bogus",), bogus={"a": 1})
    config("unknown key", ("blokcs",), strategy={**raw["strategy"], "blokcs": 3})
    config("unknown strategy", ("strategy",), strategy={"kind": "backprob"})
    config("unknown dataset", ("dataset",), data={**raw["data"], "dataset": "cifar11"})
    a_file = folder / "a-file"
    a_file.write_text("not a folder")
    config("checkpoint.root is a file", ("checkpoint.root",), checkpoint={"root": str(a_file)})
    config("data.root is a file", ("data.root",), data={**raw["data"], "root": str(a_file)})
    config("checkpoint.root ftp://", ("checkpoint.root",), checkpoint={"root": "ftp://h/x"})
    config("data.root mem://", ("data.root",), data={**raw["data"], "root": "mem://x"})
    config(
        "data.path nfs://",
        ("data.path",),
        data={"path": "nfs://server/rows.parquet", "batch_size": 32},
    )
    config("tracking scheme htp", ("tracking.uri",), tracking={"uri": "htp://localhost:5000"})
    config("tracking uri blank", ("tracking.uri",), tracking={"uri": "  "})
    config("experiment empty", ("tracking.experiment",), tracking={"experiment": ""})
    config("experiment blank", ("tracking.experiment",), tracking={"experiment": "   "})
    # `validate` does not count a built-in's rows (it would generate the data): `run` does,
    # before Ray starts.
    config(
        "batch larger than data",
        ("batch_size",),
        command="run",
        data={**raw["data"], "batch_size": 10**6},
    )
    config("nonfinite policy typo", ("nonfinite",), run={"name": "x", "nonfinite": "ignore"})
    config("cpus_per_worker inf", ("cpus_per_worker",), resources={"cpus_per_worker": math.inf})
    config("max_failures -1", ("max_failures",), resources={"max_failures": -1})
    config("keep 0", ("keep",), checkpoint={"root": str(folder / "ckpt"), "keep": 0})
    config("eval every 0", ("every",), eval={"every": 0})
    config("huge string", ("max_steps",), stop={"max_steps": "x" * 200_000})
    config(
        "gym env typo",
        ("strategy.task.env",),
        alone=True,
        strategy={**eggroll, "task": {"kind": "gym", "env": "CartPol-v1"}},
    )
    config(
        "gym width",
        ("strategy.task.hidden",),
        alone=True,
        strategy={**eggroll, "task": {"kind": "gym", "hidden": [10**9]}},
    )
    config(
        "pde diffusivity inf",
        ("diffusivity",),
        alone=True,
        strategy={"kind": "moe_hc", "problem": {"kind": "heat", "diffusivity": math.inf}},
    )
    config(
        "pbt metric typo",
        ("strategy.metric",),
        strategy={"kind": "pbt", "inner": {"kind": "backprop"}, "metric": "eval/los"},
    )

    good = [[0.1, 0.2]] * 20
    for label, features, labels, names in (
        ("NaN features", [[math.nan, 0.0]] + good[1:], [0, 1] * 10, ("x",)),
        ("inf features", [[math.inf, 0.0]] + good[1:], [0, 1] * 10, ("x",)),
        ("label 10^12", good, [0, 10**12] * 10, ("y",)),
        ("negative label", good, [0, -1] * 10, ("y",)),
    ):
        path = _table(folder, label.replace(" ", "-").replace("^", ""), features, labels)
        config(label, names, data={"path": path, "batch_size": 4})
    config(
        "missing data file",
        ("data.path", "does not exist"),
        data={"path": str(folder / "none.parquet"), "batch_size": 4},
    )

    text("binary file", bytes(range(256)))
    text("PNG header", b"\x89PNG\r\n\x1a\n\xff\x00")
    text("invalid YAML", "run: {name: x\nstop: 1\n")
    text("!!python tag", "strategy: !!python/object/apply:os.system [ls]\n")
    text("duplicate key", "stop: {max_steps: 5}\nrun: {}\nstop: {max_steps: 9}\n", ("duplicate",))
    text("duplicate nested key", "stop: {max_steps: 5, max_steps: 6}\n", ("duplicate",))
    text("YAML bomb", BILLION_LAUGHS)
    text("self alias", "a: &a [*a]\n")
    text("a list, not a mapping", "- 1\n- 2\n")
    text("a scalar", "42\n")
    text("over 10 MiB", "# " + "x" * (11 * 2**20) + "\n")
    text("bomb in a typed field", BILLION_LAUGHS.replace("i: &i", "stop: {max_steps: *h}\ni: &i"))
    inputs.append(
        BadInput("no such file", ("validate", str(folder / "missing.yaml")), ("missing.yaml",))
    )

    override("--set invalid YAML", "stop.max_steps=[1")
    override("--set !!python", "run.name=!!python/name:os.system")
    override("--set duplicate key", "strategy={a: 1, a: 2}")
    override("--set no '='", "stop.max_steps")
    override("--set empty key", "=3")
    override("--set unknown key", "stop.bogus=1")
    override("--set inf lr", "strategy.optimizer.lr=.inf")
    override("--set nan lr", "strategy.optimizer.lr=.nan")
    override("--set bomb", "stop.max_steps=" + FLOW_BOMB)
    override("--set through a scalar", "stop.max_steps.deep=1")

    schedule = folder / "schedule.yaml"
    schedule.write_text(
        yaml.safe_dump(
            {
                "format": "unlocked-hyperparameter-schedule/1",
                "config": _merged(raw, {"strategy": {"kind": "backprop", "batches_per_step": 2}}),
                "schedule": [{"step": 0, "hyperparameters": {"momentum": 0.5}}],
            }
        )
    )
    inputs.append(
        BadInput(
            "schedule, unknown hyperparameter",
            ("run", "--replay-schedule", str(schedule)),
            ("momentum",),
        )
    )
    not_schedule = folder / "not-schedule.yaml"
    not_schedule.write_text(yaml.safe_dump(raw))
    inputs.append(
        BadInput(
            "not a schedule",
            ("run", "--replay-schedule", str(not_schedule)),
            ("--replay-schedule",),
        )
    )
    inputs.append(
        BadInput(
            "resume, no checkpoint", ("run", str(folder / "base.yaml"), "--resume"), ("--resume",)
        )
    )
    inputs.append(BadInput("run without a config", ("run",), ("CONFIG",)))
    return inputs


# -- seeded mutations of the examples ------------------------------------------------------


def key_paths(node: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """Every key path of a raw config, sections and values alike."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += key_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += key_paths(value, (*prefix, index))
    return found


def _at(raw: Any, path: KeyPath) -> Any:
    for key in path:
        raw = raw[key]
    return raw


def _set(raw: Any, path: KeyPath, value: Any) -> None:
    _at(raw, path[:-1])[path[-1]] = value


def mutate(raw: dict[str, Any], rng: random.Random) -> tuple[str, KeyPath] | None:
    """One damage that no valid config survives, at a random place of ``raw``: (what was
    done, where), or None when ``raw`` has no place for the damage drawn."""
    paths = key_paths(raw)
    how = rng.choice(
        ["unknown key", "non-finite", "out of 64 bits", "section as scalar", "scalar as mapping"]
    )
    if how == "unknown key":
        sections = [p for p in paths if isinstance(_at(raw, p), dict)]
        if not sections:
            return None
        path = rng.choice(sections)
        _at(raw, path)[f"{path[-1]}_typo"] = rng.choice([1, "x", None, [1]])
        return how, path
    if how in ("non-finite", "out of 64 bits"):
        numbers = [
            p
            for p in paths
            if isinstance(_at(raw, p), (int, float)) and not isinstance(_at(raw, p), bool)
        ]
        if not numbers:
            return None
        path = rng.choice(numbers)
        if how == "non-finite":
            _set(raw, path, rng.choice([math.inf, -math.inf, math.nan]))
        else:
            _set(raw, path, rng.choice([2**64, -(2**70), 10**30]))
        return how, path
    if how == "section as scalar":
        sections = [p for p in paths if isinstance(_at(raw, p), dict)]
        if not sections:
            return None
        path = rng.choice(sections)
        _set(raw, path, rng.choice([7, "junk", [1, 2]]))
        return how, path
    strings = [p for p in paths if isinstance(_at(raw, p), str) and p[-1] != "kind"]
    if not strings:
        return None
    path = rng.choice(strings)
    _set(raw, path, {"nested": [1, {"junk": None}]})
    return how, path


def mutated_inputs(folder: Path, count: int, seed: int) -> list[BadInput]:
    """``count`` damaged copies of the example configs, the same for the same ``seed``; half
    written as files, half given as one ``--set`` item on the intact example."""
    rng = random.Random(seed)
    examples = {path.name: yaml.safe_load(path.read_text()) for path in EXAMPLES}
    inputs: list[BadInput] = []
    while len(inputs) < count:
        name = rng.choice(sorted(examples))
        raw = copy.deepcopy(examples[name])
        done = mutate(raw, rng)
        if done is None:
            continue
        how, path = done
        names = tuple(str(k) for k in path if isinstance(k, str)) + ("line ", "--set ")
        label = f"{name}: {how} at {'.'.join(map(str, path))}"
        if len(inputs) % 2 and all(isinstance(k, str) for k in path):
            item = f"{'.'.join(path)}={_flow(_at(raw, path))}"
            original = folder / f"example-{name}"
            original.write_text(yaml.safe_dump(_pinned(examples[name])))
            inputs.append(
                BadInput(f"{label} (--set)", ("validate", str(original), "--set", item), names)
            )
            continue
        file = folder / f"mutant-{len(inputs):03d}.yaml"
        file.write_text(yaml.safe_dump(_pinned(raw), allow_unicode=True))
        inputs.append(BadInput(label, ("validate", str(file)), names))
    return inputs


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (``.inf``, ``.nan``, ``{a: 1}``) for a ``--set`` item."""
    return yaml.safe_dump([value], default_flow_style=True, width=math.inf).strip()[1:-1]


def _pinned(raw: dict[str, Any]) -> dict[str, Any]:
    """The example with tracking off (unless damage replaced the section), so validating
    it reaches no server."""
    pinned = copy.deepcopy(raw)
    tracking = pinned.setdefault("tracking", {})
    if isinstance(tracking, dict):
        tracking["enabled"] = False
    return pinned


def judge_inputs(quick: bool, seed: int = 0) -> list[Verdict]:
    """Every input's verdict: the hand-written list, then the mutations."""
    with tempfile.TemporaryDirectory(prefix="chaos-inputs-") as tmp:
        folder = Path(tmp)
        with _environment(folder):
            inputs = handwritten_inputs(folder)
            inputs += mutated_inputs(folder, MUTATIONS_QUICK if quick else MUTATIONS_FULL, seed)
            return [try_input(bad) for bad in inputs]


@contextlib.contextmanager
def _environment(folder: Path) -> Iterator[None]:
    """Defaults that would point outside ``folder`` (data, checkpoints, MLflow) point in."""
    saved = {
        k: os.environ.get(k)
        for k in ("UNLOCKED_DATA_ROOT", "UNLOCKED_CHECKPOINT_ROOT", "MLFLOW_TRACKING_URI")
    }
    os.environ["UNLOCKED_DATA_ROOT"] = str(folder / "data")
    os.environ["UNLOCKED_CHECKPOINT_ROOT"] = str(folder / "ckpt")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlruns.db'}"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bad_inputs(quick: bool) -> tuple[int, int]:
    """(inputs tried, inputs rejected cleanly); ``quick`` tries fewer mutations."""
    verdicts = judge_inputs(quick)
    return len(verdicts), sum(v.clean for v in verdicts)


# -- listeners -----------------------------------------------------------------------------

LISTENER_RUN_STEPS = {True: 6, False: 20}


def public_listeners_during_run(quick: bool) -> int:
    """Start ``unlocked run`` on a small pipeline with an embedded Ray and, while it trains,
    count the distinct listening sockets of its process tree that are not on loopback.
    Raises if the run ended before Ray's servers were seen (an empty reading proves
    nothing)."""
    from orchestrator.listeners import listeners, process_tree

    with tempfile.TemporaryDirectory(prefix="chaos-listeners-") as tmp:
        folder = Path(tmp)
        raw = base_config(folder)
        raw["stop"]["max_steps"] = LISTENER_RUN_STEPS[quick]
        config = folder / "run.yaml"
        config.write_text(yaml.safe_dump(raw))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PYTHONPATH=str(REPO), TQDM_DISABLE="1")
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", str(config)],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen: set[tuple[str, str, int]] = set()
        processes: set[str] = set()
        try:
            while process.poll() is None:
                found = listeners(process_tree(process.pid))
                processes |= {item.process for item in found}
                seen |= {(item.process, item.ip, item.port) for item in found}
                time.sleep(0.5)
        finally:
            if process.poll() is None:
                process.kill()
            stderr = process.communicate(timeout=60)[1]
        if process.returncode != 0 or not {"gcs_server", "raylet"} <= processes:
            raise RuntimeError(
                f"the listener run did not show Ray's servers (exit {process.returncode}, "
                f"processes seen: {sorted(processes)}): {stderr[-2000:]}"
            )
    from orchestrator.listeners import is_loopback

    return sum(not is_loopback(ip) for _, ip, _ in seen)
