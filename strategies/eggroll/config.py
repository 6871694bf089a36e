"""`strategy: {kind: eggroll}`: low-rank evolution strategies' section."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from orchestrator.errors import ConfigError
from strategies.config import (
    MAX_LR,
    MAX_WIDTH,
    MLPConfig,
    ModelFamilyConfig,
    OptimizerConfig,
    ResNetConfig,
    StrategyConfig,
    TransformerConfig,
    check_model_reads_data,
    supervised_eval_metrics,
)
from strategies.eggroll.tasks.configs import GymTaskConfig, TaskConfig
from strategies.registry import register

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.data.source import DatasetInfo
    from strategies.eggroll.lowrank import NoiseSpec

Shaping = Literal["centered_ranks", "zscore", "none"]
Schedule = Literal["constant", "linear", "exponential"]

PERTURBED = (
    "nn.Linear and nn.Embedding (rank-r noise on the matrix, dense on the bias) and "
    "nn.LayerNorm (dense noise on its gain and bias)"
)
"""The layer types EGGROLL perturbs (``convert.es_network``), for error messages."""

# The metric that says which centre is best, per task kind.
PRIMARY = {
    "gym": ("eval/return", "max"),
    "classification": ("eval/accuracy", "max"),
    "lm": ("eval/bits_per_token", "min"),
    "char_lm": ("eval/bits_per_char", "min"),
}

# What each task's evaluation reports (strategies.eggroll.tasks); lm adds bits per token.
TASK_EVAL_METRICS = {
    "gym": ("eval/return", "eval/return_min"),
    "char_lm": ("eval/bits_per_char", "eval/loss"),
}

MAX_SIGMA = 1e3
"""The noise scale adds ``sigma * A B^T`` to weights of order 1: recipes use 0.001 to 1,
and past 1e3 a member's forward overflows float32 on its first layer."""


@register("strategies.eggroll.driver:EggrollStrategy")
class EggrollConfig(StrategyConfig):
    """EGGROLL: evolution strategies with low-rank perturbations; only seeds and fitness travel."""

    kind: Literal["eggroll"] = Field(default="eggroll", description="This strategy.")
    population: int = Field(default=256, ge=2, description="Members per generation.")
    rank: int = Field(default=1, ge=1, description="r of the A B^T perturbations.")
    sigma: float = Field(default=0.1, gt=0, le=MAX_SIGMA, description="Perturbation scale.")
    sigma_final: float | None = Field(
        default=None,
        gt=0,
        le=MAX_SIGMA,
        description="sigma at the last generation; default: sigma.",
    )
    sigma_schedule: Schedule = Field(
        default="constant", description="How sigma moves from sigma to sigma_final."
    )
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(kind="adam", lr=0.03),
        description="Applied to the ES gradient (ascent).",
    )
    lr_final: float | None = Field(
        default=None,
        gt=0,
        le=MAX_LR,
        description="Learning rate at the last generation; default: lr.",
    )
    lr_schedule: Schedule = Field(
        default="constant", description="How the learning rate moves from lr to lr_final."
    )
    antithetic: bool = Field(default=True, description="Mirrored pairs share their noise.")
    shaping: Shaping = Field(
        default="centered_ranks", description="Fitness shaping before the update."
    )
    full_rank: bool = Field(default=False, description="Classic dense-noise ES, for comparison.")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=2,
        description="Population workers (Ray actors); 'auto': as many as the cluster's free "
        "CPUs/GPUs hold, at most one per member.",
    )
    checksum_every: int = Field(default=10, ge=1, description="Generations between checks.")
    task: TaskConfig = Field(
        default_factory=GymTaskConfig, description="What the population is scored on."
    )

    def requires_data(self) -> bool:
        return self.task.kind in ("classification", "lm")

    def num_workers(self) -> int:
        """Workers asked for ('auto': one, the least that can run, until the cluster is
        known)."""
        return 1 if self.workers == "auto" else self.workers

    def workers_that_fit(self, available: Mapping[str, float], cpus: float, gpus: float) -> int:
        if self.workers == "auto":
            return workers_that_fit(available, cpus, gpus, self.population)
        return self.workers

    def summary(self) -> str:
        if self.workers == "auto":
            return f"as many workers as the cluster fits (1..{self.population})"
        return super().summary()

    def hyperparameter_names(self) -> list[str]:
        return ["sigma", "lr"]

    def eval_metrics(self, run: RunConfig) -> tuple[str, ...]:
        return TASK_EVAL_METRICS.get(self.task.kind) or supervised_eval_metrics(run)

    def check_against(self, run: RunConfig) -> None:
        if self.task.kind == "gym":
            check_gym_task(self.task)
        if self.antithetic and self.population % 2:
            raise ConfigError(
                f"strategy.population: {self.population} is odd; mirrored sampling "
                "(strategy.antithetic) needs an even population"
            )
        if self.workers != "auto" and self.population < self.workers:
            raise ConfigError(
                f"strategy.workers: {self.workers} workers for a population of "
                f"{self.population}; allowed: 1..{self.population}"
            )
        if self.requires_data() and run.data is not None:
            check_model_reads_data(run)
            mismatch = task_data_mismatch(self.task.kind, run.data.kind)
            if mismatch is not None:
                raise ConfigError(mismatch)
            unperturbed = model_refusal(run.model)
            if unperturbed is not None:
                raise ConfigError(unperturbed)

    def check_with_data(self, run: RunConfig, dataset: DatasetInfo) -> None:
        """Convert the network as every worker will: a custom network's layers must all be
        ones EGGROLL perturbs, and its units must take the leading member dim."""
        if self.requires_data():
            from strategies.eggroll.convert import check_population_forward, es_network
            from strategies.models.network import build_network
            from strategies.models.units import profile_network

            plain = build_network(run.model, dataset.input, 0)
            profile_network(plain, dataset.input)  # the units chain
            check_population_forward(es_network(plain).eval(), dataset.input)

    def noise_spec(self) -> NoiseSpec:
        from strategies.eggroll.lowrank import NoiseSpec

        return NoiseSpec(rank=self.rank, antithetic=self.antithetic, full_rank=self.full_rank)


def check_gym_task(task: GymTaskConfig) -> None:
    """The environment is registered and the policy's widths are sane, known from
    gymnasium's registry without making the environment (that happens in the driver,
    which checks its spaces)."""
    for index, width in enumerate(task.hidden):
        if width > MAX_WIDTH:
            raise ConfigError(
                f"strategy.task.hidden[{index}]: {width} is not allowed; allowed: 1..{MAX_WIDTH}"
            )
    if ":" in task.env:
        return  # 'module:EnvId': gymnasium imports the module to register it, at make
    import gymnasium

    known = list(gymnasium.envs.registry)
    if task.env not in known:
        close = difflib.get_close_matches(task.env, known, n=4, cutoff=0.5)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(
            f"strategy.task.env: {task.env!r} is not a registered gymnasium environment; "
            f"{hint}e.g. CartPole-v1, Acrobot-v1, MountainCar-v0, Pendulum-v1 (an "
            "environment of your own: 'your.module:YourEnv-v0')"
        )


def workers_that_fit(
    available: Mapping[str, float], cpus: float, gpus: float, population: int
) -> int:
    """Population workers the free resources hold: every worker takes ``cpus`` CPUs and
    ``gpus`` GPUs; at least one (the run then waits for it, up to the placement timeout,
    and says what is missing), at most one per member (a worker scores whole members)."""
    fit = int(available.get("CPU", 0.0) // cpus)
    if gpus > 0:
        fit = min(fit, int(available.get("GPU", 0.0) // gpus))
    return max(1, min(population, fit))


def model_refusal(model: ModelFamilyConfig) -> str | None:
    """Why eggroll cannot train ``model``, known from its section alone (a custom network
    is checked layer by layer when it is built), or None."""
    if isinstance(model, ResNetConfig):
        return (
            "model.kind: 'resnet' cannot be trained by eggroll: its convolutions and batch "
            f"norm are not perturbed (EGGROLL perturbs {PERTURBED}); train the resnet with "
            "strategy.kind: backprop or pipeline, or give eggroll model.kind: custom, a "
            "network of those layers (e.g. nn.Flatten(-3) then nn.Linear layers)"
        )
    if isinstance(model, MLPConfig) and model.norm == "batchnorm":
        return (
            "model.norm: 'batchnorm' is not allowed with eggroll: batch statistics are not "
            "perturbed and would mix the members sharing a batch; use 'layernorm' or 'none'"
        )
    if isinstance(model, (MLPConfig, TransformerConfig)) and model.dropout > 0:
        return (
            f"model.dropout: {model.dropout} is not allowed with eggroll, which scores "
            "deterministic members; set it to 0"
        )
    return None


def task_data_mismatch(task: str, data: str) -> str | None:
    """Why task ``kind`` cannot score ``data`` examples (an ``InputSpec.kind``), or None."""
    if task == "lm" and data != "tokens":
        return (
            f"strategy.task.kind: lm predicts next tokens, but the data gives {data} "
            "examples; give text data (data.text, a .txt data.path, or dataset: grammar) or "
            "set strategy.task.kind: classification"
        )
    if task == "classification" and data == "tokens":
        return (
            "strategy.task.kind: classification scores a class per example, but the data "
            "gives token windows; set strategy.task.kind: lm"
        )
    return None
