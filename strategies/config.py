"""The config sections every strategy shares: its own section's base, the optimizer, the model.

Plain pydantic, no torch and no Ray: a run config is validated (`unlocked validate`) without
loading either. Each strategy's ``config.py`` subclasses ``StrategyConfig``; the hooks below
are everything the controller and PBT ask of a config before anything starts, each with a
default, so a strategy overrides what it needs and nothing is probed for.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    Tag,
    TypeAdapter,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.data.source import DatasetInfo
    from orchestrator.data.spec import InputKind


class StrategyConfig(BaseModel):
    """Base of every strategy's own config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    kind: str = Field(description="Which strategy this section configures.")
    driver: ClassVar[str]
    """``module:Class`` of the strategy this section configures (set by ``registry.register``);
    imported only when a run starts, so validation loads none of its Ray or torch code."""

    @abstractmethod
    def num_workers(self) -> int:
        """Workers (placement-group bundles) the strategy needs, known before it starts."""

    def hyperparameter_names(self) -> list[str]:
        """The keys of ``Strategy.hyperparameters()``, known before the strategy is built,
        so PBT can check a search space when the config is loaded."""
        return []

    def requires_data(self) -> bool:
        """Whether the run needs a ``data`` section (False: the strategy makes its own)."""
        return True

    def gradient_batches_per_step(self) -> int | None:
        """Batches each of its gradient-trained workers takes per step, which the run's
        ``engine`` (``strategies.engines``) runs; None: the strategy takes no gradient step
        (evolution strategies), so an engine section does not apply to it."""
        return None

    def check_against(self, run: RunConfig) -> None:
        """Checks that need the rest of the run config (the model, the data); raise
        ``ConfigError`` naming the field and the fix."""

    def check_with_data(self, run: RunConfig, dataset: DatasetInfo) -> None:
        """Checks that need the resolved data and may build the model (a custom network's
        units, a cut of it into blocks): the controller runs them before Ray, a placement
        group or an MLflow run exists, so such a mistake leaves nothing behind. Raise
        ``ConfigError``; torch may be imported here, inside the method."""

    def workers_that_fit(self, available: Mapping[str, float], cpus: float, gpus: float) -> int:
        """Workers to reserve, once the cluster's free resources are known; a strategy that
        scales to the cluster (PBT's slots) asks for what fits."""
        return self.num_workers()

    def eval_metrics(self, run: RunConfig) -> tuple[str, ...] | None:
        """The unprefixed ``eval/...`` metrics its ``Strategy.evaluate`` reports for ``run``,
        so a stop target or PBT ranking a typo is refused before anything starts; None:
        not declared (nothing is checked)."""
        return None

    def summary(self) -> str:
        """What ``unlocked validate`` says the run will start."""
        return f"{self.num_workers()} worker(s)"


MAX_LR = 1e3
"""Published recipes stay below 10 (Adam near 1e-3, SGD near 0.1, ES on raw fitness near 1);
1e3 leaves room for an unusual objective while ``lr * gradient`` stays far from float32's
3.4e38, where a first step of ``lr: 1e300`` turned every weight to inf inside a worker."""

MAX_WEIGHT_DECAY = 10.0
"""Recipes use 0 to 0.1; AdamW multiplies the weights by ``1 - lr * weight_decay`` per step,
so beyond this they flip sign and grow from the first steps."""

MAX_WIDTH = 2**20
"""Units of one layer: a million-wide square layer is already 4 TiB of float32 weights;
wider is a typo (``hidden: [10**12]`` failed inside a worker while allocating)."""

LearningRate = Annotated[float, Field(gt=0, le=MAX_LR)]


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["adam", "adamw", "sgd"] = Field(default="adam", description="The optimizer.")
    lr: LearningRate = Field(default=1e-3, description=f"Learning rate, in (0, {MAX_LR:g}].")
    weight_decay: float = Field(
        default=0.0,
        ge=0,
        le=MAX_WEIGHT_DECAY,
        description="Decoupled for adamw, L2 else.",
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD only.")


_FAMILY_FOR: dict[str, str] = {"table": "mlp", "image": "resnet", "tokens": "transformer"}


class ModelFamilyConfig(BaseModel):
    """What every model family's section answers before anything is built
    (``strategies.models`` builds the network from it)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    kind: str
    inputs: ClassVar[tuple[InputKind, ...]]
    """The data kinds (``InputSpec.kind``) the family takes."""
    unit_field: ClassVar[str]
    """The field that sets how many units the network has, for error messages."""
    unit_noun: ClassVar[str]

    @abstractmethod
    def num_units(self) -> int | None:
        """Units the pipeline can place on blocks; None: known only once built."""

    def unreadable(self, data: InputKind) -> str | None:
        """Why this family cannot read ``data`` examples, or None when it can."""
        if data in self.inputs:
            return None
        return (
            f"model.kind {self.kind!r} takes {' or '.join(self.inputs)} data, but the data "
            f"gives {data} examples; for {data} data set model.kind: {_FAMILY_FOR[data]} (or "
            "custom, your own network)"
        )

    def too_few_units(self, blocks: int) -> str | None:
        """Why ``blocks`` blocks cannot be cut from this network, or None when they can
        (or cannot be known before it is built)."""
        units = self.num_units()
        if units is None or blocks <= units:
            return None
        return (
            f"{blocks} blocks but {self.units_set_by()} has {units} {self.unit_noun}; "
            f"allowed: 1..{units} (or add {self.unit_noun} to the {self.kind} model through "
            f"{self.units_set_by()})"
        )

    def units_set_by(self) -> str:
        """The field that sets this network's unit count, for messages."""
        return self.unit_field


class MLPConfig(ModelFamilyConfig):
    """A multilayer perceptron on tabular features; its units are the hidden layers."""

    kind: Literal["mlp"] = Field(default="mlp", description="The model family.")
    hidden: list[Annotated[int, Field(gt=0, le=MAX_WIDTH)]] = Field(
        default_factory=lambda: [256, 256, 256, 256],
        min_length=1,
        description="Widths of the hidden layers; the pipeline cuts these into blocks.",
    )
    activation: Literal["relu", "gelu", "tanh"] = Field(
        default="relu", description="After each hidden layer's normalisation."
    )
    norm: Literal["layernorm", "batchnorm", "none"] = Field(
        default="layernorm", description="Normalisation of each hidden layer."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="After each activation.")

    inputs: ClassVar[tuple[InputKind, ...]] = ("table",)
    unit_field: ClassVar[str] = "model.hidden"
    unit_noun: ClassVar[str] = "layers"

    def num_units(self) -> int:
        return len(self.hidden)


class ResNetConfig(ModelFamilyConfig):
    """The CIFAR ResNet of He et al. (2016, §4.2) that AugLocal trains: a 3x3 stem, then
    ``stages`` stages of basic blocks, channels doubling and resolution halving at each new
    stage, then global average pooling and a classifier. Its units are the residual blocks
    (the stem rides with the first). Depth 20/32/44/56/110 are the paper's ResNet-20..110."""

    kind: Literal["resnet"] = Field(default="resnet", description="The model family.")
    depth: int | None = Field(
        default=None,
        ge=4,
        description="Layers with weights: 2 * stages * blocks_per_stage + 2 (20, 32, 44, 56, "
        "110 with 3 stages). Default: 20, unless blocks_per_stage is set.",
    )
    blocks_per_stage: int | None = Field(
        default=None, ge=1, description="Basic blocks per stage, instead of depth."
    )
    width: int = Field(
        default=16, ge=1, le=MAX_WIDTH, description="Channels of the stem and first stage."
    )
    stages: int = Field(default=3, ge=1, description="Stages; each new one doubles channels.")
    shortcut: Literal["projection", "zero_pad"] = Field(
        default="projection",
        description="Shortcut where a block changes shape: 1x1 conv + batch norm (as AugLocal's "
        "code), or He et al.'s parameter-free option A (subsample, pad channels with zeros).",
    )

    inputs: ClassVar[tuple[InputKind, ...]] = ("image",)
    unit_field: ClassVar[str] = "model.depth"
    unit_noun: ClassVar[str] = "residual blocks"

    def units_set_by(self) -> str:
        if self.blocks_per_stage is not None:
            return "model.stages x model.blocks_per_stage"
        return "model.depth"

    @model_validator(mode="after")
    def _depth_fits_stages(self) -> ResNetConfig:
        if self.depth is not None and self.blocks_per_stage is not None:
            raise ValueError("set model.depth or model.blocks_per_stage, not both")
        if self.depth is not None and (self.depth - 2) % (2 * self.stages):
            raise ValueError(
                f"model.depth {self.depth} with {self.stages} stages: depth must be "
                f"2 * stages * n + 2, e.g. {2 * self.stages + 2} or {6 * self.stages + 2}"
            )
        return self

    def stage_blocks(self) -> int:
        """Basic blocks per stage."""
        if self.blocks_per_stage is not None:
            return self.blocks_per_stage
        return ((self.depth or 20) - 2) // (2 * self.stages)

    def num_units(self) -> int:
        return self.stages * self.stage_blocks()


class TransformerConfig(ModelFamilyConfig):
    """A decoder-only causal transformer (GPT-2 layout, pre-norm) on token windows; its
    units are the transformer blocks (the embedding rides with the first)."""

    kind: Literal["transformer"] = Field(default="transformer", description="The model family.")
    d_model: int = Field(
        default=128, ge=1, le=MAX_WIDTH, description="Width of the residual stream."
    )
    layers: int = Field(default=4, ge=1, description="Transformer blocks.")
    heads: int = Field(default=4, ge=1, description="Attention heads; must divide d_model.")
    mlp_ratio: int = Field(default=4, ge=1, description="MLP width over d_model.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="On attention and MLP.")
    tie_embeddings: bool = Field(
        default=False,
        description="The output projection shares the token embedding's weight. Needs the "
        "embedding and the output layer in one worker (backprop, or a 1-block pipeline).",
    )

    inputs: ClassVar[tuple[InputKind, ...]] = ("tokens",)
    unit_field: ClassVar[str] = "model.layers"
    unit_noun: ClassVar[str] = "transformer blocks"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerConfig:
        if self.d_model % self.heads:
            raise ValueError(
                f"model.heads {self.heads} does not divide model.d_model {self.d_model}"
            )
        return self

    def num_units(self) -> int:
        return self.layers


UnitsFactory = Callable[..., Any]
"""``f(spec: InputSpec) -> nn.Sequential | list[nn.Module]``: the units, the output layer
last (checked when the network is built: validating a config imports no torch)."""


class CustomConfig(ModelFamilyConfig):
    """Your own network: a function of the data's ``InputSpec`` that returns an
    ``nn.Sequential`` or a list of modules, each one unit, the last one the output layer."""

    kind: Literal["custom"] = Field(default="custom", description="The model family.")
    module: str | UnitsFactory = Field(
        description="'package.module:function' (importable on every worker), or through the "
        "Python API the function itself."
    )

    inputs: ClassVar[tuple[InputKind, ...]] = ("table", "image", "tokens")
    unit_field: ClassVar[str] = "model.module"
    unit_noun: ClassVar[str] = "units"

    @field_validator("module")
    @classmethod
    def _import_path(cls, value: str | UnitsFactory) -> str | UnitsFactory:
        if isinstance(value, str) and not re.fullmatch(r"[\w.]+:[\w.]+", value):
            raise ValueError(
                f"{value!r} is not 'package.module:function' (e.g. 'mypkg.nets:small_cnn')"
            )
        return value

    @field_serializer("module", when_used="json")
    def _named(self, value: str | UnitsFactory) -> str:
        """A function is written as its import path, so YAML/JSON dumps (MLflow params,
        checkpoint digests) hold text; a function defined in a notebook or inside another
        function is written too, but cannot be imported back from that text."""
        if isinstance(value, str):
            return value
        return f"{value.__module__}:{value.__qualname__}"

    def num_units(self) -> None:
        return None


def _family_of(value: Any) -> str | None:
    """The family a model section names; a section without ``kind`` is an MLP."""
    if isinstance(value, dict):
        return value.get("kind", "mlp")
    return getattr(value, "kind", None)


AnyModelConfig = Annotated[
    Annotated[MLPConfig, Tag("mlp")]
    | Annotated[ResNetConfig, Tag("resnet")]
    | Annotated[TransformerConfig, Tag("transformer")]
    | Annotated[CustomConfig, Tag("custom")],
    Discriminator(
        _family_of,
        custom_error_type="model_kind",
        custom_error_message="unknown model kind; allowed: mlp | resnet | transformer | custom",
    ),
]
"""Any family's section, chosen by its ``kind``."""

_ANY_MODEL = TypeAdapter(AnyModelConfig)


class ModelConfig:
    """The ``model`` section of a run: one family's config, chosen by ``kind`` (``mlp``
    when absent). As a field type it validates into that family's class; called, it does
    the same, so ``ModelConfig(hidden=[64])`` is an ``MLPConfig`` and
    ``ModelConfig(kind="resnet", depth=32)`` a ``ResNetConfig``."""

    def __new__(cls, **fields: Any) -> ModelFamilyConfig:  # type: ignore[misc]
        return _ANY_MODEL.validate_python(fields)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return handler(AnyModelConfig)


def supervised_eval_metrics(run: RunConfig) -> tuple[str, ...]:
    """What a network trained on ``run.data`` reports held out (``strategies.models.loss``):
    loss and accuracy, and bits per token for a language model."""
    tokens = run.data is not None and run.data.kind == "tokens"
    return ("eval/loss", "eval/accuracy", *(("eval/bits_per_token",) if tokens else ()))


def check_model_reads_data(run: RunConfig) -> None:
    """For strategies that train ``run.model`` on ``run.data``: refuse, before anything
    starts, a model family that cannot read the data's examples."""
    if run.data is not None and (why := run.model.unreadable(run.data.kind)) is not None:
        raise ConfigError(why)
