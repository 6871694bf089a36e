"""How step time grows with workers, nodes and model size, from measured costs.

Two small models, one per way of splitting work, each fed by costs that
``benchmarks.scaling`` measures on the machine it runs on (compute in-process, the
transport between actors) and checked there against the runs it times:

* **pipeline**: in a full pipe every block works at once, so a batch leaves every
  ``max_k stage_k`` seconds. A stage is its block's compute (body and local head, forward
  and backward) plus its share of one actor call (amortised over the batches a call
  carries) plus moving its activation to the next block. Blocks that share cores slow
  down in proportion.
* **eggroll**: the population's forward splits over workers; the update does not (every
  worker applies the same one, which is what keeps weights off the network); each worker
  costs the driver one round trip of calls.

Both are deliberately coarse: they ignore memory bandwidth shared between cores, the
driver's own CPU, and stragglers. The scaling benchmark prints how far each prediction is
from the measurement, so the model's error on this machine is part of its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def core_share(workers: int, cores: int) -> float:
    """How much slower each worker runs when ``workers`` busy processes share ``cores``."""
    return max(1.0, workers / cores)


@dataclass(frozen=True)
class PipelineCosts:
    stage_s: Sequence[float]
    """Compute of each block per batch (body and head, forward and backward), seconds."""
    call_s: float
    """One actor call's overhead, paid once per call by every block."""
    bytes_per_batch: float
    """Activation and labels a block sends to the next, per batch."""
    bytes_per_s: float
    """Actor-to-actor transfer rate."""
    batches_per_call: int


def pipeline_batch_s(costs: PipelineCosts, cores: int) -> float:
    """Seconds per batch in steady state, one block per actor, the actors on ``cores``."""
    blocks = len(costs.stage_s)
    send = costs.bytes_per_batch / costs.bytes_per_s if blocks > 1 else 0.0
    slowest = max(costs.stage_s) * core_share(blocks, cores)
    return slowest + costs.call_s / costs.batches_per_call + send


@dataclass(frozen=True)
class EggrollCosts:
    member_s: float
    """One member's fitness evaluation, within a batched population forward, seconds."""
    update_s: float
    """One replica's update from the generation's fitness vector."""
    call_s: float
    """One worker's round trip of calls per generation (fitness and update)."""
    population: int


def eggroll_generation_s(costs: EggrollCosts, workers: int, cores: int) -> float:
    """Seconds per generation with ``workers`` population workers on ``cores`` cores.

    Evaluation splits over the cores the workers get; every worker's update is the same
    work, so it costs one update per core's worth of workers; the driver pays each
    worker's round trip in turn.
    """
    parallel = min(workers, cores)
    evaluate = costs.population * costs.member_s / parallel
    update = costs.update_s * core_share(workers, cores)
    return evaluate + update + workers * costs.call_s


def scaled_eggroll(costs: EggrollCosts, compute_factor: float) -> EggrollCosts:
    """The same costs for a model ``compute_factor`` times as expensive per member and per
    update (both grow with the parameter count; the calls carry only scalars and do not)."""
    return EggrollCosts(
        member_s=costs.member_s * compute_factor,
        update_s=costs.update_s * compute_factor,
        call_s=costs.call_s,
        population=costs.population,
    )


def scaled_pipeline(
    costs: PipelineCosts, blocks: int, compute_factor: float, width_factor: float
) -> PipelineCosts:
    """A balanced cut into ``blocks`` of a network ``compute_factor`` times as expensive
    as the measured one, whose activations are ``width_factor`` times as wide."""
    total = sum(costs.stage_s) * compute_factor
    return PipelineCosts(
        stage_s=[total / blocks] * blocks,
        call_s=costs.call_s,
        bytes_per_batch=costs.bytes_per_batch * width_factor,
        bytes_per_s=costs.bytes_per_s,
        batches_per_call=costs.batches_per_call,
    )


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured
