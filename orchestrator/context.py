"""RunContext: a strategy's only window on the controller.

Through it a strategy spawns its workers inside the run's placement group and learns
the seed, the dataset, the device policy and the run's config; it never touches Ray
placement, checkpoints or tracking itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.errors import UserError
from orchestrator.recovery import FailureBudget, SetupRefused

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.data.source import DatasetInfo


@dataclass
class RunContext:
    config: RunConfig
    dataset: DatasetInfo | None
    placement_group: PlacementGroup
    failures: FailureBudget
    """The run's one budget of worker losses (PBT charges its slots' losses to it)."""
    generation: int = 0
    bundle_offset: int = 0
    name_prefix: str = ""
    actors: list[Any] = field(default_factory=list)
    share: int | None = None
    """Bundles of the group this context's strategy fills, when not all of them (a PBT
    trial's slot)."""
    bundles: dict[str, int] = field(default_factory=dict)
    """Worker name (``block-0``, ``population-2``) -> its bundle of the run's group."""

    @property
    def seed(self) -> int:
        return self.config.run.seed

    @property
    def device(self) -> str:
        return "cuda" if self.config.resources.gpus_per_worker > 0 else "cpu"

    @property
    def bundle_count(self) -> int:
        """How many workers the strategy may place: the run's whole group (as many as
        ``workers_that_fit`` reserved, e.g. for EGGROLL's ``workers: auto``), or its
        slot's share for a PBT trial."""
        return self.placement_group.bundle_count if self.share is None else self.share

    @property
    def threads(self) -> int:
        res = self.config.resources
        return res.threads_per_worker or max(1, int(res.cpus_per_worker))

    def spawn(
        self,
        cls: type,
        *args: Any,
        role: str,
        index: int,
        bundle: int | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Start ``cls`` as an actor on bundle ``bundle_offset + index`` (or ``+ bundle``,
        when workers of two roles share the group) of the run's placement group;
        ``num_cpus``/``num_gpus`` override the worker's share (a driver-like actor that only
        schedules others takes none)."""
        res = self.config.resources
        worker = f"{self.name_prefix}{role}-{index}"
        bundle_index = self.bundle_offset + (index if bundle is None else bundle)
        actor = (
            ray.remote(_refusals_reported(cls))
            .options(
                name=f"{self.config.run_name}/{worker}/g{self.generation}",
                num_cpus=res.cpus_per_worker if num_cpus is None else num_cpus,
                num_gpus=res.gpus_per_worker if num_gpus is None else num_gpus,
                max_restarts=0,
                # Every call of a worker is a Ray task, and the GCS keeps an event record
                # of each (up to 100,000): per batch, that grew gcs_server by about
                # 0.16 MiB/s and cost a sixth of the pipeline's steps/s. Recovery needs
                # none of it; only the dashboard's task list and `ray list tasks` go blank.
                enable_task_events=False,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group,
                    placement_group_bundle_index=bundle_index,
                ),
            )
            .remote(*args, **kwargs)
        )
        self.actors.append(actor)
        self.bundles[worker] = bundle_index
        return actor

    def for_trial(self, config: RunConfig, bundle_offset: int, name_prefix: str) -> RunContext:
        """The context of a strategy hosted inside this run (a PBT trial): its own config
        and share of the placement group. Its losses are its host's to charge (PBT rebuilds
        the slot, in the driver, against the run's budget), so it gets none of its own."""
        return RunContext(
            config,
            self.dataset,
            self.placement_group,
            FailureBudget(limit=0),
            bundle_offset=bundle_offset,
            name_prefix=name_prefix,
            share=config.strategy.num_workers(),
        )

    def kill_workers(self) -> list[str]:
        """Tear every worker down so a restore starts from a clean slate; returns their
        actor ids, for waiting until Ray has buried them."""
        lost = [actor._actor_id.hex() for actor in self.actors]
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        self.bundles.clear()
        self.generation += 1
        return lost


@functools.cache
def _refusals_reported(cls: type) -> type:
    """``cls``, whose constructor raises a ``UserError`` as ``SetupRefused``: the only
    form in which its message reaches the driver (``orchestrator.recovery``). Named as
    ``cls`` (as Ray names the class it wraps), so logs and errors name the worker. A
    class with no constructor of its own is left as it is: nothing in it can refuse, and
    ``object.__init__`` is a C slot that Ray's tracing cannot give a signature."""
    if cls.__init__ is object.__init__:
        return cls

    class Worker(cls):  # type: ignore[misc, valid-type]
        @functools.wraps(cls.__init__)  # Ray checks a call's arguments by this signature
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                super().__init__(*args, **kwargs)
            except UserError as err:
                raise SetupRefused.carrying(err) from None

    Worker.__module__, Worker.__name__, Worker.__qualname__ = (
        cls.__module__,
        cls.__name__,
        cls.__qualname__,
    )
    return Worker
