"""Storage and tracking faults for the chaos benchmark.

Each scenario trains a small run on local Ray with one fault injected, and compares it
with a fault-free run of the same config and seed: the final metrics (``metric_delta``)
and MLflow's record of every step (``duplicated_and_missing``).

- ``mlflow_restart``: the tracking server is SIGKILLed mid-run and started again a few
  steps later. Training must not wait for it, and every step reaches it once.
- ``checkpoint_write_interrupted``: the driver dies halfway through writing a checkpoint
  file (a truncated file, then an exception nothing handles). ``--resume`` must pass over
  the half-written checkpoint and continue from the newest complete one.
- ``storage_read_only`` / ``storage_full``: the checkpoint storage refuses writes after the
  first checkpoint (chmod 0500 of the run's folder, or an injected EROFS where this process
  is root and ignores modes; ENOSPC partway through a file). The run stops with one
  ``CheckpointWriteError`` naming the folder and the fix, its last complete checkpoint
  intact and its MLflow run FAILED; once the storage takes writes again, ``--resume`` ends
  on the fault-free figures.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.chaos_outcome import FaultOutcome, duplicated_and_missing, metric_delta

COMPARED = ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy")
"""The figures a faulted run must end on (timings and memory differ between any two runs)."""
STEPS, CHECKPOINT_EVERY = 8, 2
STRATEGIES = {True: ("backprop",), False: ("backprop", "pipeline")}
AS_ROOT = os.geteuid() == 0
REFUSALS = {True: ("full",), False: ("read-only", "full")}
"""How storage refuses writes, per mode (as root, read-only is an injected EROFS)."""


# -- a real MLflow server on loopback -------------------------------------------------------

# `mlflow server` is this app under uvicorn, configured by these variables. Starting the
# CLI costs 10-20 s on two cores (two interpreters import the app); this launcher imports
# it once and forks a fresh server process per start, so a restart takes well under a
# second.
LAUNCHER = """
import os, signal, sys
from mlflow.server import ARTIFACT_ROOT_ENV_VAR, ARTIFACTS_DESTINATION_ENV_VAR
from mlflow.server import BACKEND_STORE_URI_ENV_VAR, SERVE_ARTIFACTS_ENV_VAR
from mlflow.utils.server_cli_utils import resolve_default_artifact_root
port, root = int(sys.argv[1]), sys.argv[2]
store = f"sqlite:///{root}/mlflow.db"
os.environ[BACKEND_STORE_URI_ENV_VAR] = store
os.environ[ARTIFACT_ROOT_ENV_VAR] = resolve_default_artifact_root(True, None, store)
os.environ[ARTIFACTS_DESTINATION_ENV_VAR] = f"{root}/artifacts"
os.environ[SERVE_ARTIFACTS_ENV_VAR] = "true"
import uvicorn
from mlflow.server.fastapi_app import app
server = 0
for command in sys.stdin:
    if command.strip() == "start" and not server:
        server = os.fork()
        if server == 0:
            uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
            os._exit(0)
    elif command.strip() == "kill" and server:
        os.kill(server, signal.SIGKILL)
        os.waitpid(server, 0)
        server = 0
if server:  # the caller is done (or died): no server outlives it
    os.kill(server, signal.SIGKILL)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real MLflow tracking server on loopback: one database, one port, restartable."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(self.port), str(root)],
            stdin=subprocess.PIPE,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            text=True,
        )

    def _command(self, command: str) -> None:
        assert self.launcher.stdin is not None
        self.launcher.stdin.write(command + "\n")
        self.launcher.stdin.flush()

    def _answers(self, timeout_s: float) -> bool:
        import requests

        try:
            return requests.get(f"{self.uri}/health", timeout=timeout_s).ok
        except requests.RequestException:
            return False

    def start(self) -> None:
        self._command("start")
        deadline = time.monotonic() + 60
        while not self._answers(1.0):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the MLflow server did not start: {self._log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: whatever it was doing is cut off, as in a crash."""
        self._command("kill")
        deadline = time.monotonic() + 10
        while self._answers(0.2):
            if time.monotonic() > deadline:
                raise RuntimeError("the MLflow server did not stop")
            time.sleep(0.05)

    def close(self) -> None:
        if self.launcher.stdin is not None:
            self.launcher.stdin.close()
        self.launcher.wait(timeout=30)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


# -- runs ----------------------------------------------------------------------------------


def run_config(
    folder: Path, data_root: Path, strategy: str, seed: int, tracking_uri: str
) -> dict[str, Any]:
    """A small run on ``digits``: 8 steps, a checkpoint every 2 (the newest 2 kept)."""
    strategies = {
        "backprop": {"kind": "backprop", "batches_per_step": 4},
        "pipeline": {
            "kind": "pipeline",
            "blocks": 2,
            "batches_per_step": 4,
            "optimizer": {"kind": "adam", "lr": 0.002},
        },
    }
    return {
        "run": {"name": f"chaos-{strategy}", "seed": seed},
        "strategy": strategies[strategy],
        "model": {"hidden": [64, 64]},
        "data": {"dataset": "digits", "batch_size": 64, "root": str(data_root)},
        "tracking": {"uri": tracking_uri, "experiment": "chaos", "system_metrics": False},
        "checkpoint": {"root": str(folder / "ckpt"), "every": CHECKPOINT_EVERY, "keep": 2},
        "stop": {"max_steps": STEPS},
        "eval": {"every": 4},
    }


def figures(metrics: dict[str, float]) -> dict[str, float]:
    return {key: float(metrics[key]) for key in COMPARED if key in metrics}


def logged_steps(tracking_uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    """Every step MLflow holds for ``key`` in ``run_id``, repeats included."""
    from mlflow import MlflowClient

    return [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


def run_status(tracking_uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).info.status


def on_step(hook: Callable[[Any, int], None]) -> Any:
    """A callback calling ``hook(run, step)`` after every step."""
    from orchestrator.callbacks import Callback

    class OnStep(Callback):
        def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
            hook(run, step)

    return OnStep()


def outcome(
    scenario: str,
    strategy: str,
    calm: dict[str, float],
    ended: dict[str, float] | None,
    steps: list[int],
    recovered: bool,
    started: float,
    detail: str,
) -> FaultOutcome:
    duplicated, missing = duplicated_and_missing(steps, range(1, STEPS + 1))
    delta = metric_delta(calm, ended) if ended else float("inf")
    return FaultOutcome(
        scenario=scenario,
        strategy=strategy,
        faults_injected=1,
        faults_recovered=int(recovered and delta == 0.0),
        steps_duplicated=duplicated,
        steps_missing=missing,
        metric_delta=delta,
        seconds=time.monotonic() - started,
        detail=detail,
    )


# -- scenarios -----------------------------------------------------------------------------


def mlflow_restart(raw: dict[str, Any], folder: Path, calm: dict[str, float]) -> FaultOutcome:
    """Kill the tracking server after step 2, start it again after step 5."""
    import unlocked

    started = time.monotonic()
    server = MlflowServer(folder)
    raw = {**raw, "tracking": {**raw["tracking"], "uri": server.uri}}

    def outage(_run: Any, step: int) -> None:
        if step == 2:
            server.kill()
        elif step == 5:
            server.start()

    try:
        server.start()
        result = unlocked.run(raw, callbacks=[on_step(outage)])
        steps = logged_steps(server.uri, result.mlflow_run_id)
        status = run_status(server.uri, result.mlflow_run_id)
    finally:
        server.close()
    return outcome(
        "mlflow_restart",
        raw["strategy"]["kind"],
        calm,
        figures(result.metrics),
        steps,
        status == "FINISHED",
        started,
        f"server down for steps 3-5; MLflow status {status}",
    )


class DriverDied(BaseException):
    """Stands in for the driver process dying: nothing in the run handles it."""


@contextlib.contextmanager
def checkpoint_writes(fault: Callable[[str, bytes], None]) -> Iterator[None]:
    """Route every checkpoint file write through ``fault(path, data)`` first."""
    from orchestrator.checkpoint import CheckpointStore

    real = CheckpointStore._write

    def write(self: CheckpointStore, path: str, data: bytes) -> dict[str, Any]:
        fault(path, data)
        return real(self, path, data)

    CheckpointStore._write = write  # type: ignore[method-assign]
    try:
        yield
    finally:
        CheckpointStore._write = real  # type: ignore[method-assign]


def half_written(path: str, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data[: len(data) // 2])


def checkpoint_write_interrupted(
    raw: dict[str, Any], calm: dict[str, float], at_step: int = 6
) -> FaultOutcome:
    """The driver dies with half of checkpoint ``at_step``'s first file written; then
    ``--resume``."""
    import unlocked

    started = time.monotonic()
    target = f"step-{at_step:09d}/"

    def die_mid_write(path: str, data: bytes) -> None:
        if target in path:
            half_written(path, data)
            raise DriverDied(path)

    died = ""
    try:
        with checkpoint_writes(die_mid_write):
            unlocked.run(raw)
    except DriverDied as err:
        died = str(err)
    if not died:
        raise RuntimeError(f"the fault never fired: no checkpoint file of step {at_step}")
    resumed = unlocked.run(raw, resume=True)
    first = resumed.history[0][0]
    steps = logged_steps(resumed.tracking_uri, resumed.mlflow_run_id)
    status = run_status(resumed.tracking_uri, resumed.mlflow_run_id)
    return outcome(
        "checkpoint_write_interrupted",
        raw["strategy"]["kind"],
        calm,
        figures(resumed.metrics),
        steps,
        first == at_step - CHECKPOINT_EVERY + 1 and status == "FINISHED",
        started,
        f"died writing {Path(died).name} of step {at_step}; resumed at step {first}; "
        f"MLflow status {status}",
    )


@contextlib.contextmanager
def refusing_storage(how: str, folder: Path, after_step: int) -> Iterator[Callable[[], None]]:
    """Checkpoint storage that refuses writes once checkpoint ``after_step`` exists:
    ``read-only`` (chmod 0500 of the run's attempt folder; as root, which ignores modes,
    EROFS on every write), ``full`` (ENOSPC halfway through the next file). Yields the
    function that turns the fault on; leaving the block repairs the storage."""
    armed: list[Path] = []

    def arm() -> None:
        attempt = next(folder.glob(f"*/*/step-{after_step:09d}")).parent
        armed.append(attempt)
        if how == "read-only" and not AS_ROOT:
            attempt.chmod(stat.S_IRUSR | stat.S_IXUSR)

    def fault(path: str, data: bytes) -> None:
        if not armed:
            return
        if how == "full":
            half_written(path, data)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        if AS_ROOT:  # otherwise the folder's mode refuses the write itself
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    with checkpoint_writes(fault):
        try:
            yield arm
        finally:
            for attempt in armed:
                attempt.chmod(stat.S_IRWXU)
            armed.clear()


def storage_refuses_writes(
    raw: dict[str, Any], calm: dict[str, float], how: str, after_step: int = 2
) -> FaultOutcome:
    """Storage refuses checkpoints after ``after_step``: the run must stop with one
    ``CheckpointWriteError`` naming the folder, its last checkpoint intact and its MLflow
    run FAILED; repaired, ``--resume`` ends on the fault-free figures."""
    import unlocked
    from orchestrator.checkpoint import CheckpointStore, CheckpointWriteError

    started = time.monotonic()
    folder = Path(raw["checkpoint"]["root"])
    failed_run: list[str] = []

    def remember(run: Any, step: int) -> None:
        if run.tracker is not None:
            failed_run[:] = [run.tracker.run_id]
        if step == after_step:
            arm()

    stopped: CheckpointWriteError | None = None
    with refusing_storage(how, folder, after_step) as arm:
        try:
            unlocked.run(raw, callbacks=[on_step(remember)])
        except CheckpointWriteError as err:
            stopped = err
    if stopped is None:
        raise RuntimeError(f"the run trained on past {how} storage without an error")
    kept = CheckpointStore(str(Path(stopped.directory).parent)).latest()
    failed_status = run_status(raw["tracking"]["uri"], failed_run[0])
    injected = "chmod 0500" if how == "read-only" and not AS_ROOT else "injected OSError"
    resumed = unlocked.run(raw, resume=True)
    steps = logged_steps(resumed.tracking_uri, resumed.mlflow_run_id)
    status = run_status(resumed.tracking_uri, resumed.mlflow_run_id)
    recovered = (
        kept is not None
        and kept.step == after_step
        and failed_status == "FAILED"
        and status == "FINISHED"
        and str(Path(stopped.directory).parent) in str(stopped)
    )
    return outcome(
        f"storage_{how.replace('-', '_')}",
        raw["strategy"]["kind"],
        calm,
        figures(resumed.metrics),
        steps,
        recovered,
        started,
        f"{injected}; stopped at the step-{stopped.step} checkpoint ({stopped.__cause__}); "
        f"kept step {kept.step if kept else None}; MLflow {failed_status}, after --resume "
        f"{status}",
    )


def run_all(quick: bool, seed: int) -> list[FaultOutcome]:
    """Every storage and tracking scenario, for backprop (and, unless ``quick``, a
    pipeline), each against a fault-free run of the same seed."""
    import ray

    import unlocked

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    outcomes: list[FaultOutcome] = []
    try:
        with tempfile.TemporaryDirectory(prefix="chaos-storage-") as tmp:
            root = Path(tmp)
            uri = f"sqlite:///{root / 'mlruns.db'}"
            for strategy in STRATEGIES[quick]:

                def fresh(name: str, strategy: str = strategy) -> tuple[dict[str, Any], Path]:
                    folder = root / strategy / name
                    folder.mkdir(parents=True)
                    return run_config(folder, root / "data", strategy, seed, uri), folder

                raw, _ = fresh("calm")
                calm = figures(unlocked.run(raw).metrics)
                raw, folder = fresh("mlflow")
                outcomes.append(mlflow_restart(raw, folder, calm))
                outcomes.append(checkpoint_write_interrupted(fresh("interrupted")[0], calm))
                for how in REFUSALS[quick]:
                    outcomes.append(storage_refuses_writes(fresh(how)[0], calm, how))
    finally:
        if started_ray:
            ray.shutdown()
    return outcomes
