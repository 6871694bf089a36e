"""`strategy: {kind: pbt}`: population based training's section; its trials run any other
strategy, configured in ``inner``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from orchestrator.errors import ConfigError
from strategies.backprop.config import BackpropConfig
from strategies.config import StrategyConfig
from strategies.pbt.search_space import Distribution
from strategies.registry import AnyStrategyConfig, register

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.data.source import DatasetInfo


def _not_nested(inner: StrategyConfig) -> StrategyConfig:
    if inner.kind == "pbt":
        raise ValueError("a PBT trial cannot itself be PBT; choose another strategy kind")
    return inner


@register("strategies.pbt.driver:PbtStrategy")
class PbtConfig(StrategyConfig):
    """Population based training over any other strategy (asynchronous exploit/explore)."""

    kind: Literal["pbt"] = Field(default="pbt", description="This strategy.")
    inner: Annotated[AnyStrategyConfig, AfterValidator(_not_nested)] = Field(
        default_factory=BackpropConfig,
        description="The strategy each trial runs, with its own options.",
    )
    population: int = Field(default=4, ge=2, description="Trials.")
    metric: str = Field(default="eval/accuracy", description="What trials are ranked by.")
    mode: Literal["max", "min"] = Field(
        default="max", description="Whether a higher or a lower metric is better."
    )
    interval: int = Field(
        default=5, gt=0, description="Inner steps per perturbation interval (then rank)."
    )
    quantile_fraction: float = Field(
        default=0.25,
        ge=0.0,
        le=0.5,
        description="Bottom fraction that exploits the top fraction; 0: random search.",
    )
    resample_probability: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Explore: resample instead of perturb."
    )
    perturbation_factors: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.8, 1.2],
        min_length=1,
        description="Explore: a number is multiplied by one of these.",
    )
    synchronous: bool = Field(default=False, description="Rank the whole population at once.")
    burn_in: int = Field(
        default=0, ge=0, description="Inner steps a trial trains before it may be replaced."
    )
    concurrent_trials: int | None = Field(
        default=None, ge=1, description="Slots; default: as many as the cluster fits."
    )
    search_space: dict[str, Distribution] = Field(
        default_factory=lambda: {"lr": Distribution(loguniform=(1e-4, 1e-1))},
        min_length=1,
        description="Mutable hyperparameters: {name: {loguniform: [lo, hi]}, ...}",
    )

    def requires_data(self) -> bool:
        return self.inner.requires_data()

    def gradient_batches_per_step(self) -> int | None:
        return self.inner.gradient_batches_per_step()

    @model_validator(mode="after")
    def _space_is_tunable(self) -> PbtConfig:
        known = self.inner.hyperparameter_names()
        unknown = sorted(set(self.search_space) - set(known))
        if unknown:
            raise ValueError(
                f"search_space: {unknown} are not hyperparameters of strategy "
                f"{self.inner.kind!r}; it has {sorted(known)}"
            )
        if self.concurrent_trials is not None and self.concurrent_trials > self.population:
            raise ValueError(
                f"concurrent_trials {self.concurrent_trials} exceeds population "
                f"{self.population}; at most one slot per trial"
            )
        return self

    def check_against(self, run: RunConfig) -> None:
        from orchestrator.config import check_reported

        inner = inner_run_config(run)
        try:
            self.inner.check_against(inner)
        except ConfigError as err:
            raise ConfigError(str(err).replace("strategy.", "strategy.inner.", 1)) from None
        check_reported("strategy.metric", self.metric, self.inner.eval_metrics(inner))

    def eval_metrics(self, run: RunConfig) -> tuple[str, ...] | None:
        """The best trial's held-out metrics, and which trial that is."""
        inner = self.inner.eval_metrics(inner_run_config(run))
        return None if inner is None else (*inner, "eval/best_trial")

    def check_with_data(self, run: RunConfig, dataset: DatasetInfo) -> None:
        self.inner.check_with_data(inner_run_config(run), dataset)

    def hyperparameter_names(self) -> list[str]:
        return []

    def summary(self) -> str:
        slots = self.concurrent_trials or "as many"
        fit = "" if self.concurrent_trials else " as fit"
        return (
            f"{self.population} {self.inner.kind} trials on {slots} slot(s){fit} of "
            f"{self.slot_workers()} worker(s)"
        )

    def slot_workers(self) -> int:
        return self.inner.num_workers()

    def num_workers(self) -> int:
        """Workers of the slots asked for (auto: one slot, the least that can run)."""
        return (self.concurrent_trials or 1) * self.slot_workers()

    def workers_that_fit(self, available: Mapping[str, float], cpus: float, gpus: float) -> int:
        """With ``concurrent_trials`` unset, as many slots as the free CPUs/GPUs hold."""
        if self.concurrent_trials is not None:
            return self.num_workers()
        per_slot = self.slot_workers()
        slots = int(available.get("CPU", 0) // (per_slot * cpus))
        if gpus > 0:
            slots = min(slots, int(available.get("GPU", 0) // (per_slot * gpus)))
        return max(1, min(self.population, slots)) * per_slot


def inner_run_config(run: RunConfig) -> RunConfig:
    """The run config a trial sees: the inner strategy, and the whole run's step budget."""
    pbt = run.strategy
    stop = run.stop.model_copy(
        update={"max_steps": run.stop.max_steps * pbt.interval, "target": None}
    )
    return run.model_copy(update={"strategy": pbt.inner, "stop": stop})
