"""The run configuration: one YAML file, validated strictly before anything starts.

Every section forbids unknown keys, so a typo is an error instead of a silently ignored
option. The strategy section is validated by the model its ``kind`` names among the
registered strategies (see ``strategies.registry``), looked up when a config is validated:
importing this module loads neither Ray nor torch, and no strategy's driver.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import ConfigError, UserError, format_validation_error
from orchestrator.locations import CHECKPOINT_ROOT_ENV, DATA_ROOT_ENV, checkpoint_root, data_root
from strategies.config import ModelConfig
from strategies.registry import AnyStrategyConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Run name; defaults to the config file's stem. Checkpoints live under it.",
    )
    seed: int = Field(default=0, ge=0, description="Seeds data order, initialisation and noise.")


class DataConfig(Section):
    dataset: str | None = Field(
        default=None, description="A built-in dataset name (see `unlocked datasets`)."
    )
    path: str | None = Field(
        default=None, description="A Parquet file or directory (local path or URI) of your own."
    )
    test_path: str | None = Field(
        default=None, description="Held-out Parquet data; without it test_fraction is split off."
    )
    features: list[str] = Field(
        default_factory=lambda: ["x"],
        min_length=1,
        description="Feature columns: numeric scalars or fixed-size lists, concatenated.",
    )
    label: str = Field(default="y", description="Integer class label column.")
    num_classes: int | None = Field(default=None, ge=2)
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    batch_size: int = Field(default=128, gt=0)
    size: int | None = Field(
        default=None, gt=0, description="Samples to generate for a built-in dataset."
    )
    root: str = Field(
        default_factory=data_root,
        description=f"Where built-in datasets are written; default: ${DATA_ROOT_ENV}, "
        "else .unlocked/datasets.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.dataset is None) == (self.path is None):
            raise ValueError(
                "set exactly one of data.dataset (a built-in name) or data.path (your Parquet data)"
            )
        if self.test_path is not None and self.path is None:
            raise ValueError("data.test_path needs data.path")
        return self


class ResourcesConfig(Section):
    address: str | None = Field(
        default=None,
        description="Ray address: None starts a local Ray (or uses RAY_ADDRESS), 'auto' joins "
        "the running cluster, 'host:port' or 'ray://host:port' a given one.",
    )
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    threads_per_worker: int | None = Field(
        default=None, gt=0, description="torch threads per worker; default: its CPUs."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(default=3, ge=0, description="Worker losses recovered per run.")
    placement_timeout_s: float = Field(default=60.0, gt=0)


class TrackingConfig(Section):
    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db",
    )
    experiment: str = "unlocked"
    system_metrics: bool = True
    enabled: bool = True


class CheckpointConfig(Section):
    root: str = Field(
        default_factory=checkpoint_root,
        description=f"Local path or s3:// gs:// hdfs:// URI; default: ${CHECKPOINT_ROOT_ENV}, "
        "else .unlocked/checkpoints.",
    )
    every: int = Field(default=10, gt=0, description="Checkpoint every N steps.")
    keep: int = Field(default=3, gt=0, description="Complete checkpoints kept per run.")


class TargetMetric(Section):
    metric: str
    value: float
    mode: Literal["max", "min"] = "max"

    def reached(self, metrics: dict[str, float]) -> bool:
        if self.metric not in metrics:
            return False
        value = metrics[self.metric]
        return value >= self.value if self.mode == "max" else value <= self.value


class StopConfig(Section):
    max_steps: int = Field(default=100, gt=0)
    max_wall_s: float | None = Field(default=None, gt=0)
    target: TargetMetric | None = None


class EvalConfig(Section):
    every: int = Field(default=10, gt=0, description="Evaluate every N steps and at the end.")
    max_batches: int | None = Field(default=None, gt=0, description="Cap on held-out batches.")


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    strategy: AnyStrategyConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig | None = None
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _strategy_fits_model(self) -> RunConfig:
        if self.data is None and self.strategy.requires_data():
            raise ConfigError(
                f"data: strategy {self.strategy.kind!r} trains on data; add a data section "
                "(e.g. `data: {dataset: digits}`)"
            )
        self.strategy.check_against(self)
        return self

    @property
    def run_name(self) -> str:
        assert self.run.name is not None, "load_config fills run.name"
        return self.run.name


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` to the raw YAML mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(
            f"--set {assignment!r}: expected key.path=value, e.g. --set stop.max_steps=50"
        )
    path, _, text = assignment.partition("=")
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: empty key in {path!r}")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {key!r} holds a value, not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(text) if text.strip() else None


def load_config(
    path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read, override and validate a run config; raise ConfigError with every problem found."""
    file = Path(path)
    raw = read_yaml_mapping(file, "config file", "a mapping of sections")
    return config_from_mapping(raw, overrides, source=str(file), default_name=file.stem)


def read_yaml_mapping(
    file: Path, what: str, shape: str, error: type[UserError] = ConfigError
) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or ``error`` saying which of those it is not."""
    if not file.is_file():
        raise error(f"{what} {str(file)!r} does not exist")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"{file}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise error(f"{file}: the top level must be {shape}")
    return raw


def config_from_mapping(
    raw: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    source: str = "<config>",
    default_name: str | None = None,
) -> RunConfig:
    """Override, name (when the config has no run.name) and validate a raw config."""
    for assignment in overrides:
        apply_override(raw, assignment)
    raw.setdefault("run", {})
    if default_name and isinstance(raw["run"], dict) and not raw["run"].get("name"):
        raw["run"]["name"] = default_name
    return validate_mapping(raw, source=source)


def validate_mapping(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
