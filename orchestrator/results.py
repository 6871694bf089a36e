"""What a finished run hands back: to the CLI, to ``unlocked.run`` and to ``on_finish``."""

from __future__ import annotations

from dataclasses import dataclass, field

from strategies.base import Metrics


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker runs: its node (Ray's id and address) and its bundle of the run's
    placement group."""

    node_id: str
    node_ip: str
    bundle: int


@dataclass
class RunResult:
    run_name: str
    step: int
    """The last step trained."""
    metrics: Metrics
    """The last step's metrics, with the final evaluation's."""
    checkpoint_dir: str
    """This attempt's checkpoints (``--resume`` continues from the newest)."""
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    ui_url: str | None = None
    failures: int = 0
    """Worker losses recovered."""
    stopped_by: str = "max_steps"
    """max_steps, target, max_wall_s, or the signal that stopped it (SIGINT, SIGTERM)."""
    peak_training_bytes: dict[str, int] = field(default_factory=dict)
    history: list[tuple[int, Metrics]] = field(default_factory=list)
    """Each step's metrics once, as it last ran, in step order: when a lost worker or a
    rollback sends the run back to a checkpoint, the steps after it are dropped and their
    replays take their place (as MLflow keeps one record of each step). Every step of
    a run up to 10,000 steps; beyond, every 2nd, 4th, ... step with the first and the last,
    so a long run's driver does not grow by its record (MLflow has every step)."""
    artifacts: list[str] = field(default_factory=list)
    """The strategy's own records published to MLflow (e.g. ``pbt/winner_schedule.yaml``)."""
    placement: dict[str, WorkerPlacement] = field(default_factory=dict)
    """Worker name (``block-0``) -> where it ran at the end (after any recovery moved it);
    also logged to MLflow as ``placement.json``."""
