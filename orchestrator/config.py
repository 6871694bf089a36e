"""The run configuration: one YAML file, validated strictly before anything starts.

Every section forbids unknown keys, so a typo is an error instead of a silently ignored
option. The strategy section is validated by the model its ``kind`` names among the
registered strategies (see ``strategies.registry``), looked up when a config is validated:
importing this module loads neither Ray nor torch, and no strategy's driver.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.config_yaml import parse_yaml, read_yaml_file
from orchestrator.data.files import is_text_file, is_uri
from orchestrator.data.spec import MAX_CLASSES, InputKind
from orchestrator.errors import ConfigError, UserError, format_validation_error
from orchestrator.locations import CHECKPOINT_ROOT_ENV, DATA_ROOT_ENV, checkpoint_root, data_root
from orchestrator.nonfinite import check_policy
from strategies.config import ModelConfig
from strategies.registry import AnyStrategyConfig


class Section(BaseModel):
    # inf and NaN are refused by every float field: a run would train to NaN on them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


MAX_SEED = 2**32 - 1
"""numpy and gymnasium take 32-bit seeds, and the seeds derived from the run's (such as
``seed * 1_000_003 + stream``) then stay inside torch's 64-bit range."""


class RunSection(Section):
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Run name; defaults to the config file's stem. Checkpoints live under it.",
    )
    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="Seeds data order, initialisation and noise."
    )
    nonfinite: Literal["stop", "rollback", "skip"] = Field(
        default="stop",
        description="When a loss, fitness or gradient norm turns NaN or infinite: 'stop' ends "
        "the run as failed (the checkpoints before it kept), 'rollback' goes back to the last "
        "checkpoint with the learning rate halved, at most run.max_rollbacks times, 'skip' "
        "leaves out each such update (EGGROLL: member) and goes on, stopping at a step that "
        "has none left to apply.",
    )
    max_rollbacks: int = Field(
        default=3, ge=1, description="Rollbacks of run.nonfinite: rollback before the run stops."
    )


class ImageConfig(Section):
    column: str = Field(
        default="image",
        description="The image column: lists of C*H*W numbers (uint8 0..255 or float, flat or "
        "nested) or encoded PNG/JPEG bytes.",
    )
    shape: tuple[PositiveInt, PositiveInt, PositiveInt] | None = Field(
        default=None,
        description="[C, H, W] of one image; required for your own data (built-ins know theirs).",
    )
    augment: bool = Field(
        default=True,
        description="Random crop of the zero-padded image and horizontal flip, train batches only.",
    )
    crop_padding: int | None = Field(
        default=None,
        ge=1,
        description="Zero padding of the random crop; default 4 px (the CIFAR recipe), 1 px for "
        "the 8x8 built-in digits.",
    )
    flip: bool | None = Field(
        default=None,
        description="Mirror half the train images; default on, off for the built-in digits "
        "(a mirrored digit is not a digit).",
    )
    mean: list[float] | None = Field(
        default=None,
        min_length=1,
        description="Per-channel mean on the [0, 1] pixel scale; default: measured on the "
        "train split.",
    )
    std: list[float] | None = Field(
        default=None, min_length=1, description="Per-channel standard deviation, with mean."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ImageConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError(
                "set both data.image.mean and data.image.std, or neither (both are then "
                "measured on the train split)"
            )
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"data.image.std: {self.std} must be positive in every channel")
        if self.mean is not None and len(self.mean) != len(self.std or []):
            raise ValueError("data.image.mean and data.image.std need one value per channel each")
        if self.mean is not None and self.shape is not None and len(self.mean) != self.shape[0]:
            raise ValueError(
                f"data.image.mean: {len(self.mean)} values for {self.shape[0]} channels "
                f"(data.image.shape {list(self.shape)}); give one per channel"
            )
        if not self.augment and (self.crop_padding is not None or self.flip is not None):
            raise ValueError(
                "data.image.crop_padding / flip tune the augmentation, which augment: false "
                "turns off; remove them or set augment: true"
            )
        return self


class TextConfig(Section):
    column: str | None = Field(
        default=None,
        description="The text column of Parquet data (default 'text'); a .txt file needs none.",
    )
    tokenizer: str = Field(
        default="bytes",
        description="'bytes' (UTF-8 bytes, vocabulary 256) or the path of a `tokenizers` "
        "library tokenizer.json.",
    )
    context: int = Field(
        default=128, gt=0, description="Tokens a model sees (T); a window holds T + 1."
    )


class DataConfig(Section):
    dataset: str | None = Field(
        default=None, description="A built-in dataset name (see `unlocked datasets`)."
    )
    path: str | None = Field(
        default=None,
        description="Your own data (local path or URI): a Parquet file or directory, or a UTF-8 "
        ".txt file for a language model.",
    )
    test_path: str | None = Field(
        default=None, description="Held-out data; without it test_fraction is split off."
    )
    features: list[str] = Field(
        default_factory=lambda: ["x"],
        min_length=1,
        description="Tables only: feature columns, numeric scalars or fixed-size lists, "
        "concatenated.",
    )
    label: str = Field(default="y", description="Integer class label column (tables, images).")
    num_classes: int | None = Field(
        default=None,
        ge=2,
        le=MAX_CLASSES,
        description="Classes of the label; default: counted in the data.",
    )
    image: ImageConfig | None = Field(
        default=None, description="Image classification: the image column and its preparation."
    )
    text: TextConfig | None = Field(
        default=None, description="Language modelling: the text, its tokenizer and context."
    )
    test_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="Rows held out for evaluation (no test_path)."
    )
    batch_size: int = Field(default=128, gt=0, description="Rows per training batch.")
    size: int | None = Field(
        default=None, gt=0, description="Samples to generate for a built-in dataset."
    )
    root: str = Field(
        default_factory=data_root,
        description=f"Where built-in datasets are written; default: ${DATA_ROOT_ENV}, "
        "else .unlocked/datasets.",
    )

    @field_validator("path", "test_path")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and (why := unknown_scheme(value)) is not None:
            raise ValueError(why)
        return value

    @field_validator("root")
    @classmethod
    def _root_is_folder(cls, value: str) -> str:
        return checked_root(value)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.dataset is None) == (self.path is None):
            raise ValueError(
                "set exactly one of data.dataset (a built-in name) or data.path (your Parquet data)"
            )
        if self.test_path is not None and self.path is None:
            raise ValueError("data.test_path needs data.path")
        return self

    @property
    def kind(self) -> InputKind:
        """What one example is, known from the config alone (no file is read)."""
        if self.dataset is not None:
            from orchestrator.data.builtin import builtin_dataset  # numpy, pyarrow: lazily

            return builtin_dataset(self.dataset, None)[0].kind  # an unknown name: its error
        if self.image is not None:
            return "image"
        if self.text is not None or is_text_file(self.path):
            return "tokens"
        return "table"

    @model_validator(mode="after")
    def _one_kind(self) -> DataConfig:
        text = self.text is not None or is_text_file(self.path)
        if self.image is not None and text:
            what = "data.text" if self.text is not None else f"the text file {self.path!r}"
            raise ValueError(f"data.image and {what}: a data set is images or text, not both")
        if "features" in self.model_fields_set and (self.image is not None or text):
            raise ValueError(
                "data.features applies to tables only; images are read from data.image.column "
                "and text from data.text (remove data.features)"
            )
        if text and ("label" in self.model_fields_set or self.num_classes is not None):
            raise ValueError(
                "data.label / data.num_classes: a language model predicts the next token, whose "
                "vocabulary comes from data.text.tokenizer; remove them"
            )
        if self.text is not None and self.text.column is not None and is_text_file(self.path):
            raise ValueError(
                f"data.text.column: {self.path!r} is a text file, which has no columns; remove "
                "data.text.column (it names the text column of Parquet data)"
            )
        if self.image is not None and self.path is not None and self.image.shape is None:
            raise ValueError(
                "data.image.shape: required for your own images, e.g. [3, 32, 32] (channels, "
                "height, width)"
            )
        return self


class ResourcesConfig(Section):
    address: str | None = Field(
        default=None,
        description="Ray address: None starts a local Ray (or uses RAY_ADDRESS), 'auto' joins "
        "the running cluster, 'host:port' or 'ray://host:port' a given one.",
    )
    cpus_per_worker: float = Field(
        default=1.0, gt=0, description="CPUs reserved for each worker (Ray actor)."
    )
    gpus_per_worker: float = Field(
        default=0.0, ge=0, description="GPUs per worker; a fraction shares one GPU."
    )
    threads_per_worker: int | None = Field(
        default=None, gt=0, description="torch threads per worker; default: its CPUs."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="How Ray's placement group lays the workers on nodes."
    )
    max_failures: int = Field(default=3, ge=0, description="Worker losses recovered per run.")
    placement_timeout_s: float = Field(
        default=60.0, gt=0, description="Seconds to wait for the cluster to fit every worker."
    )


class TrackingConfig(Section):
    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db",
    )
    experiment: str = Field(
        default="unlocked",
        min_length=1,
        pattern=r"\S",
        description="MLflow experiment of the run.",
    )
    system_metrics: bool = Field(
        default=True,
        description="Log the CPU, memory, disk and network use of the driver's machine.",
    )
    enabled: bool = Field(default=True, description="Log to MLflow at all.")

    @field_validator("uri")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        """The URI's syntax only: whether its server answers is checked when a run starts."""
        if value is None:
            return value
        if not value.strip():
            raise ValueError(
                "empty; remove it (the default is $MLFLOW_TRACKING_URI, else "
                "sqlite:///mlruns.db) or give one such as http://host:5000"
            )
        scheme = tracking_scheme(value)
        if scheme is not None and scheme not in TRACKING_SCHEMES:
            raise ValueError(
                f"scheme {scheme!r} is not an MLflow store; allowed: "
                f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} or a local folder"
            )
        return value


class CheckpointConfig(Section):
    root: str = Field(
        default_factory=checkpoint_root,
        description=f"Local path or s3:// gs:// hdfs:// URI; default: ${CHECKPOINT_ROOT_ENV}, "
        "else .unlocked/checkpoints.",
    )
    every: int = Field(default=10, gt=0, description="Checkpoint every N steps.")
    keep: int = Field(default=3, gt=0, description="Complete checkpoints kept per run.")

    @field_validator("root")
    @classmethod
    def _root_is_folder(cls, value: str) -> str:
        return checked_root(value)


class TargetMetric(Section):
    metric: str = Field(description="The metric watched, e.g. eval/accuracy.")
    value: float = Field(description="Stop once the metric reaches this value.")
    mode: Literal["max", "min"] = Field(
        default="max", description="max: reached at or above value; min: at or below."
    )

    def reached(self, metrics: dict[str, float]) -> bool:
        if self.metric not in metrics:
            return False
        value = metrics[self.metric]
        return value >= self.value if self.mode == "max" else value <= self.value


class StopConfig(Section):
    max_steps: int = Field(default=100, gt=0, description="Steps to train.")
    max_wall_s: float | None = Field(
        default=None, gt=0, description="Stop after this many seconds of training, across resumes."
    )
    target: TargetMetric | None = Field(
        default=None, description="Stop early once a metric reaches a value."
    )


class EvalConfig(Section):
    every: int = Field(default=10, gt=0, description="Evaluate every N steps and at the end.")
    max_batches: int | None = Field(default=None, gt=0, description="Cap on held-out batches.")


class EngineConfig(Section):
    kind: Literal["torch", "accelerate", "deepspeed"] = Field(
        default="torch",
        description="What runs each worker's gradient step: plain torch, Hugging Face "
        "Accelerate (device placement, mixed precision, accumulation) or DeepSpeed (ZeRO).",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="Mixed precision of the forward and backward (accelerate, deepspeed); "
        "fp16 needs a GPU.",
    )
    grad_accumulation: int = Field(
        default=1,
        ge=1,
        description="Batches whose mean gradient makes one optimizer step; it must divide "
        "the strategy's batches_per_step, so checkpoints fall between steps.",
    )
    zero_stage: Literal[1, 2] | None = Field(
        default=None,
        description="DeepSpeed only: ZeRO stage, 1 partitions the optimizer state, 2 the "
        "gradients too; default 1.",
    )
    offload_optimizer: bool | None = Field(
        default=None,
        description="DeepSpeed only: keep the optimizer state (and its step) in CPU memory.",
    )
    offload_activations: Literal["none", "host", "disk"] = Field(
        default="none",
        description="Where the activations a forward saves for its backward wait (SSDTrain-"
        "style, asynchronous, read back ahead of the backward): kept in memory, pinned host "
        "memory (GPU workers only) or files on the worker's disk.",
    )
    offload_dir: str | None = Field(
        default=None,
        description="offload_activations: disk only: the directory (on every worker's node) "
        "that holds each worker's files; default: the system's temporary directory.",
    )
    offload_min_bytes: int | None = Field(
        default=None,
        ge=0,
        description="With offload_activations: saved tensors smaller than this stay in "
        "memory (not worth the trip); default 65536.",
    )

    @model_validator(mode="after")
    def _fits_kind(self) -> EngineConfig:
        for name in ("zero_stage", "offload_optimizer"):
            if self.kind != "deepspeed" and getattr(self, name) is not None:
                raise ValueError(
                    f"engine.{name} applies to DeepSpeed only; remove it or set "
                    "engine.kind: deepspeed"
                )
        if self.kind == "torch" and self.precision != "fp32":
            raise ValueError(
                f"engine.precision: {self.precision!r} needs a mixed-precision engine; set "
                "engine.kind: accelerate or deepspeed, or precision: fp32"
            )
        if self.offload_dir is not None and self.offload_activations != "disk":
            raise ValueError(
                f"engine.offload_dir: {self.offload_dir!r} applies to offload_activations: "
                f"disk only (it is {self.offload_activations!r}); remove it or set "
                "offload_activations: disk"
            )
        if self.offload_min_bytes is not None and self.offload_activations == "none":
            raise ValueError(
                f"engine.offload_min_bytes: {self.offload_min_bytes} applies only when "
                "activations are offloaded; remove it or set offload_activations: disk (or "
                "host on a GPU)"
            )
        return self

    @property
    def stage(self) -> int:
        """The ZeRO stage DeepSpeed runs (1 when unset)."""
        return self.zero_stage or 1

    @property
    def min_offload_bytes(self) -> int:
        """The size below which a saved tensor stays in memory (65536 when unset)."""
        return 65536 if self.offload_min_bytes is None else self.offload_min_bytes


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection, description="Name and seed.")
    strategy: AnyStrategyConfig = Field(
        description="The training strategy, by kind (`unlocked strategies` lists them)."
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="The network the data strategies train."
    )
    data: DataConfig | None = Field(
        default=None, description="The dataset; strategies that make their own need none."
    )
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="The Ray cluster and each worker's share."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Where the run is logged (MLflow)."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Where and how often state is saved."
    )
    stop: StopConfig = Field(default_factory=StopConfig, description="When training ends.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="What runs the gradient step of each worker that takes one.",
    )

    @model_validator(mode="after")
    def _numbers_fit(self) -> RunConfig:
        """Every number of every section, including a strategy's nested ones: finite, and an
        integer within 64 bits (torch's and numpy's), or a worker fails on it after Ray and
        MLflow started."""
        for where, value in numbers(self):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where}: {value} is not allowed; give a finite number")
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                raise ConfigError(
                    f"{where}: {value} is not allowed; allowed: a whole number within "
                    f"-2**63..2**63-1"
                )
        return self

    @model_validator(mode="after")
    def _engine_fits_run(self) -> RunConfig:
        engine = self.engine
        if engine == EngineConfig():
            return self
        batches = self.strategy.gradient_batches_per_step()
        if batches is None:
            raise ConfigError(
                f"engine: strategy {self.strategy.kind!r} takes no gradient step, so it has "
                "no engine; remove the engine section"
            )
        if engine.precision == "fp16" and self.resources.gpus_per_worker == 0:
            raise ConfigError(
                "engine.precision: 'fp16' needs a GPU (its loss scaling is CUDA's); set "
                "resources.gpus_per_worker, or precision: bf16 on a CPU"
            )
        if engine.offload_activations == "host" and self.resources.gpus_per_worker == 0:
            raise ConfigError(
                "engine.offload_activations: 'host' saves nothing on CPU workers (their "
                "activations are in host memory already); use 'disk', or set "
                "resources.gpus_per_worker"
            )
        if batches % engine.grad_accumulation:
            raise ConfigError(
                f"engine.grad_accumulation: {engine.grad_accumulation} does not divide the "
                f"{batches} batches of a step (strategy.batches_per_step); a checkpoint must "
                "fall between optimizer steps, so choose a divisor of it"
            )
        return self

    @model_validator(mode="after")
    def _strategy_fits_model(self) -> RunConfig:
        if self.data is None and self.strategy.requires_data():
            raise ConfigError(
                f"data: strategy {self.strategy.kind!r} trains on data; add a data section "
                "(e.g. `data: {dataset: digits}`)"
            )
        self.strategy.check_against(self)
        return self

    @model_validator(mode="after")
    def _nonfinite_fits_strategy(self) -> RunConfig:
        strategy = self.strategy
        # A host (PBT) runs its inner strategy's workers, which are the ones that skip.
        inner = strategy.inner.kind if strategy.kind == "pbt" else None
        check_policy(self.run.nonfinite, strategy.kind, strategy.hyperparameter_names(), inner)
        return self

    @model_validator(mode="after")
    def _target_is_reported(self) -> RunConfig:
        if self.stop.target is not None:
            check_reported(
                "stop.target.metric", self.stop.target.metric, self.strategy.eval_metrics(self)
            )
        return self

    @property
    def run_name(self) -> str:
        assert self.run.name is not None, "load_config fills run.name"
        return self.run.name


TRACKING_SCHEMES = (
    "file",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
)
"""The stores MLflow's tracking client opens (a database's ``+driver`` suffix aside)."""

STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""The URI schemes ``pyarrow.fs.FileSystem.from_uri`` opens."""


def tracking_scheme(uri: str) -> str | None:
    """``http`` of ``http://host``, ``postgresql`` of ``postgresql+psycopg2://…``; None for
    a plain local folder."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri)
    return None if match is None else match[1].split("+", 1)[0].lower()


def unknown_scheme(location: str) -> str | None:
    """Why a storage location's URI scheme cannot be opened, or None when it can."""
    if not is_uri(location):
        return None
    scheme = location.split("://", 1)[0].lower()
    if scheme in STORAGE_SCHEMES:
        return None
    return (
        f"scheme {scheme + '://'!r} is not supported; allowed: a local path or "
        f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}"
    )


def checked_root(value: str) -> str:
    """A folder that runs write under: a URI with a known scheme, or a local path that is
    a folder or does not exist yet (it is created when a run starts)."""
    if (why := unknown_scheme(value)) is not None:
        raise ValueError(why)
    if not is_uri(value):
        local = Path(value).expanduser()
        if local.exists() and not local.is_dir():
            raise ValueError("a file, not a folder; give a folder (it is created when missing)")
    return value


def check_reported(field: str, metric: str, reported: tuple[str, ...] | None) -> None:
    """A held-out metric the strategy does not report would never be reached: refuse it,
    naming the close ones. Only unprefixed ``eval/...`` names are checked, and only for
    strategies that declare theirs (``StrategyConfig.eval_metrics``)."""
    if reported is None or not metric.startswith("eval/") or metric in reported:
        return
    close = difflib.get_close_matches(metric, reported, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ConfigError(
        f"{field}: {metric!r} is not a metric this strategy reports; {hint}it reports "
        f"{', '.join(reported)}"
    )


def numbers(value: Any, where: str = "") -> Iterator[tuple[str, int | float]]:
    """Every number in a validated config, with its dotted path."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield where, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from numbers(getattr(value, name), f"{where}.{name}".lstrip("."))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from numbers(item, f"{where}[{index}]")


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
    node[keys[-1]] = parse_yaml(text, f"--set {assignment!r}") if text.strip() else None


def read_override_file(path: str | os.PathLike[str]) -> list[str]:
    """A ``--set-from`` file: a YAML list of ``KEY.PATH=VALUE`` strings, each one ``--set``.

    Why a file: a value given on a shell line must survive the shell's quoting; one read
    from a file never meets a shell (the Helm chart ships its overrides this way)."""
    file = Path(path)
    items = read_yaml_file(file, "--set-from") or []
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(
            f"--set-from {str(file)!r}: must be a YAML list of KEY.PATH=VALUE strings, "
            'e.g. ["stop.max_steps=100", "run.name=demo"]'
        )
    return items


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
    raw = read_yaml_file(file, what, error) or {}
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
