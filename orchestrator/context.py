"""RunContext: a strategy's only window on the controller.

Through it a strategy spawns its workers inside the run's placement group and learns
the seed, the dataset, the device policy and the run's config; it never touches Ray
placement, checkpoints or tracking itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.config import RunConfig
from orchestrator.data.source import DatasetInfo


@dataclass
class RunContext:
    config: RunConfig
    dataset: DatasetInfo | None
    placement_group: PlacementGroup
    generation: int = 0
    actors: list[Any] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return self.config.run.seed

    @property
    def device(self) -> str:
        return "cuda" if self.config.resources.gpus_per_worker > 0 else "cpu"

    @property
    def threads(self) -> int:
        res = self.config.resources
        return res.threads_per_worker or max(1, int(res.cpus_per_worker))

    def spawn(self, cls: type, *args: Any, role: str, index: int, **kwargs: Any) -> Any:
        """Start ``cls`` as an actor on bundle ``index`` of the run's placement group."""
        res = self.config.resources
        actor = (
            ray.remote(cls)
            .options(
                name=f"{self.config.run_name}/{role}-{index}/g{self.generation}",
                num_cpus=res.cpus_per_worker,
                num_gpus=res.gpus_per_worker,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=index
                ),
            )
            .remote(*args, **kwargs)
        )
        self.actors.append(actor)
        return actor

    def kill_workers(self) -> None:
        """Tear every worker down so a restore starts from a clean slate."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        self.generation += 1
