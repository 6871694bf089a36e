"""What a population forward of EGGROLL costs, against plain inference and full-rank ES.

Two measurements, both on an MLP of three h x h ``ESLinear`` layers (input h, two hidden
layers of h, output h), so the h x h matmuls dominate and the figures say something about
the layer itself rather than about a thin input or output projection:

* ``eval_vs_inference``: k perturbed members, S rows each, against one batched inference
  of the unperturbed model on the same k * S rows. The claim under test is that a
  low-rank population costs about as much as inference on the same number of rows. The
  EGGROLL side includes regenerating the members' noise with ``member_noise``: every worker
  does that each generation (noise is never stored or sent), so leaving it out would
  flatter the method. Its share of the time is reported separately.
* ``versus_full_rank``: one population evaluation with rank-r noise against classic ES with
  dense per-member noise and materialised weights. Memory is reported analytically (the
  bytes of noise each form holds, r(m + n) against mn per matrix, which is the point of the
  method) and as measured peak RSS growth (noise plus activations and the temporaries each
  form makes; not the shared noise table, a fixed 64 MiB per process built before
  measuring). Each hidden size runs in a fresh subprocess with its resident high-water
  mark reset per form, so an earlier, bigger configuration can neither hide a peak nor
  lend it memory malloc kept resident. Sizes whose full-rank noise would pass
  ``FULL_RANK_LIMIT_BYTES`` are skipped and marked so.

No command line here: a benchmark script calls these and prints the tables and JSON.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import torch
from torch import nn

from strategies.eggroll.lowrank import (
    ESLinear,
    NoiseSpec,
    ParamNoise,
    es_parameters,
    member_noise,
    noise_table,
    population,
)

GIB = 1 << 30
# Full-rank noise above this is not attempted: its transient copies (per-member tensors,
# the stacked tensor, the scaled tensor, W + E per layer) put the peak at about 1.7x the
# noise itself (measured: 5.4 GB for 3.2 GB of noise), so about 10 GiB here, which on a
# 24 GiB machine shared with other work is the most we dare.
FULL_RANK_LIMIT_BYTES = 6 * GIB
SIGMA = 0.02
SEED = 0
FLOAT_BYTES = 4
NAN = float("nan")
# Each timed repeat averages calls until it lasts this long (see ``_per_call``).
MIN_SECONDS = 0.05
# Cheap cells get more repeats, up to this many seconds per side: on a shared 2-core
# machine one repeat of a 0.1-0.5 s cell moves by +-10 %, more than the gaps measured.
REPEAT_BUDGET_S = 3.0
MAX_REPEATS = 15


def build_mlp(hidden: int) -> nn.Sequential:
    """h -> h -> h -> h: every weight is square, so every layer costs the same and dominates."""
    torch.manual_seed(0)
    return nn.Sequential(
        ESLinear(hidden, hidden),
        nn.Tanh(),
        ESLinear(hidden, hidden),
        nn.Tanh(),
        ESLinear(hidden, hidden),
    )


def noise_bytes(model: nn.Module, members: int, rank: int, full_rank: bool) -> int:
    """Bytes of float32 noise a population holds, from the shapes alone (nothing allocated).

    Matrices: k r (m + n) elements low rank, k m n full rank; vectors: k d either way.
    """
    total = 0
    for param in es_parameters(model):
        if param.dim() == 2:
            m, n = param.shape
            total += members * (m * n if full_rank else rank * (m + n))
        else:
            total += members * param.numel()
    return total * FLOAT_BYTES


def held_bytes(noise: Sequence[ParamNoise]) -> int:
    """Bytes the generated noise actually occupies: checks ``noise_bytes`` against reality."""
    elements = 0
    for item in noise:
        elements += item.a.numel() + (item.b.numel() if item.b is not None else 0)
    return elements * FLOAT_BYTES


def _per_call(fn: Callable[[], object]) -> float:
    """Mean seconds of ``fn`` over as many calls as fill ``MIN_SECONDS`` (at least one).

    Small configurations take a few milliseconds, where one call's timing is mostly
    scheduler noise on a shared two-core machine; big ones run once.
    """
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_SECONDS:
            return elapsed / calls


def _population_step(
    model: nn.Module, x: torch.Tensor, spec: NoiseSpec, generation: int
) -> tuple[float, float, list[ParamNoise]]:
    """One generation's evaluation: regenerate every member's noise, then the batched forward.

    Returns (noise seconds, forward seconds, the noise) so callers can split the cost and
    inspect what was held.
    """
    members = range(x.shape[0])
    start = time.perf_counter()
    noise = member_noise(es_parameters(model), members, SEED, generation, SIGMA, spec)
    middle = time.perf_counter()
    with population(model, noise):
        model(x)
    end = time.perf_counter()
    return middle - start, end - middle, noise


def _population_per_call(
    model: nn.Module, x: torch.Tensor, spec: NoiseSpec, first_generation: int
) -> tuple[float, float, int]:
    """Mean (noise, forward) seconds per generation over calls filling ``MIN_SECONDS``.

    Each call is a new generation, so the noise is really regenerated, never reused.
    Returns the next unused generation too.
    """
    noise_total = forward_total = 0.0
    generation = first_generation
    while noise_total + forward_total < MIN_SECONDS or generation == first_generation:
        noise_s, forward_s, _ = _population_step(model, x, spec, generation)
        noise_total += noise_s
        forward_total += forward_s
        generation += 1
    calls = generation - first_generation
    return noise_total / calls, forward_total / calls, generation


def _repeats_for(call_s: float, at_least: int) -> int:
    """Repeats for a cell whose inference call takes ``call_s``: ``at_least``, more for
    cheap cells (up to ``REPEAT_BUDGET_S`` of inference), so every median is of enough."""
    per_repeat = max(call_s, MIN_SECONDS)
    return max(at_least, min(MAX_REPEATS, math.ceil(REPEAT_BUDGET_S / per_repeat)))


def _inference_case(
    hidden: int, members: int, samples: int, rank: int, repeats: int
) -> dict[str, float]:
    model = build_mlp(hidden)
    spec = NoiseSpec(rank=rank, antithetic=True, full_rank=False)
    # Distinct rows for every member (not x.expand) so both sides read the same amount of
    # input; inference sees exactly these rows, flattened into one batch.
    x = torch.randn(members, samples, hidden)
    flat = x.reshape(members * samples, hidden)

    # Warm-up (thread pool, kernel selection, malloc growing its mmap threshold so buffers
    # stop being faulted in afresh on every call), as long as one timed repeat.
    _per_call(lambda: model(flat))
    _population_per_call(model, x, spec, first_generation=0)
    repeats = _repeats_for(_per_call(lambda: model(flat)), repeats)

    # Interleaved, so a burst of load from elsewhere on the machine hits both sides alike.
    inference, noise_times, forward_times, totals = [], [], [], []
    generation = 1
    for _ in range(repeats):
        inference.append(_per_call(lambda: model(flat)))
        noise_s, forward_s, generation = _population_per_call(model, x, spec, generation)
        noise_times.append(noise_s)
        forward_times.append(forward_s)
        totals.append(noise_s + forward_s)

    rows = members * samples
    inference_s = statistics.median(inference)
    noise_s = statistics.median(noise_times)
    forward_s = statistics.median(forward_times)
    eggroll_s = statistics.median(totals)
    return {
        "hidden": float(hidden),
        "population": float(members),
        "samples_per_member": float(samples),
        "rank": float(rank),
        "threads": float(torch.get_num_threads()),
        "inference_s": inference_s,
        "eggroll_s": eggroll_s,
        "noise_s": noise_s,
        "forward_s": forward_s,
        "inference_samples_per_s": rows / inference_s,
        "eggroll_samples_per_s": rows / eggroll_s,
        # Throughput of EGGROLL over throughput of inference: 1.0 means "free".
        "ratio": inference_s / eggroll_s,
        # The same without noise regeneration: what the batched low-rank layer itself costs.
        "forward_ratio": inference_s / forward_s,
        "noise_share": noise_s / (noise_s + forward_s),
        "repeats": float(repeats),
    }


def eval_vs_inference(
    hidden_sizes: Sequence[int],
    populations: Sequence[int],
    samples_per_member: int,
    rank: int = 1,
    repeats: int = 3,
    threads: int | None = None,
) -> list[dict[str, float]]:
    """Member-samples/s of a low-rank population forward against plain batched inference.

    One row per (hidden, population). Times are medians of at least ``repeats`` after one
    warm-up (each repeat averages enough calls to last ``MIN_SECONDS``; cheap cells get
    more repeats, see ``_repeats_for``); ``threads`` pins torch's
    intra-op threads for the duration (None: torch's default).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return [
                _inference_case(hidden, members, samples_per_member, rank, repeats)
                for hidden in hidden_sizes
                for members in populations
            ]
    finally:
        torch.set_num_threads(previous)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset this process's resident high-water mark (VmHWM); False where Linux won't.

    Writing 5 to clear_refs (Linux >= 4.0) is what makes a per-phase peak measurable:
    ru_maxrss only ever grows, so the interpreter's own start-up peak (importing torch)
    would hide every small phase after it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    if reset:
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _measure_form(
    model: nn.Module, x: torch.Tensor, spec: NoiseSpec, repeats: int
) -> tuple[float, int, int]:
    """Median seconds of one population evaluation, bytes of noise held, peak RSS growth.

    The growth is the high-water mark over warm-up and repeats minus the resident size
    just before; -1 when it cannot be trusted (no reset, and an earlier peak hid this one).
    """
    reset = _reset_peak()
    before = psutil.Process().memory_info().rss
    peak_before = _peak_rss_bytes(reset)
    _, _, noise = _population_step(model, x, spec, generation=0)
    held = held_bytes(noise)
    del noise
    # Warm-up, as in ``_inference_case``: this runs first in a fresh process.
    _, _, generation = _population_per_call(model, x, spec, first_generation=1)
    totals = []
    for _ in range(repeats):
        noise_s, forward_s, generation = _population_per_call(model, x, spec, generation)
        totals.append(noise_s + forward_s)
    peak_after = _peak_rss_bytes(reset)
    growth = peak_after - before if reset or peak_after > peak_before else -1
    return statistics.median(totals), held, growth


def full_rank_case(
    hidden: int, members: int, samples: int, rank: int, repeats: int, threads: int | None = None
) -> dict[str, float]:
    """Low rank then full rank for one hidden size; meant to run in its own process.

    A fresh process per size keeps the allocator clean: memory freed by a bigger earlier
    size may stay resident in malloc's heap and be reused unseen, under-reading growth.
    Low rank goes first for the same reason, and so that without a resettable peak full
    rank's high-water mark is still a fresh one.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    # The shared noise table (64 MiB, both forms read it) is part of a worker's set-up,
    # made once per process whatever the model or population: built before measuring.
    noise_table()
    with torch.no_grad():
        model = build_mlp(hidden)
        x = torch.randn(members, samples, hidden)
        low_s, low_bytes, low_rss = _measure_form(model, x, NoiseSpec(rank, True, False), repeats)
        full_s, full_bytes, full_rss = _measure_form(model, x, NoiseSpec(rank, True, True), repeats)
    return {
        "low_s": low_s,
        "full_s": full_s,
        "low_noise_bytes": low_bytes,
        "full_noise_bytes": full_bytes,
        "low_peak_rss_growth_bytes": low_rss,
        "full_peak_rss_growth_bytes": full_rss,
        "threads": torch.get_num_threads(),
    }


_CHILD = (
    "import json, sys\n"
    "from benchmarks.eggroll_forward import full_rank_case\n"
    "print(json.dumps(full_rank_case(**json.loads(sys.argv[1]))))\n"
)


def _run_isolated(**kwargs: int | None) -> dict[str, float]:
    """``full_rank_case`` in a fresh interpreter, so its RSS high-water mark starts clean.

    A plain subprocess rather than multiprocessing: spawn would re-import the caller's main
    module, which a benchmark script need not guard.
    """
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(kwargs)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"full-rank comparison failed (h={kwargs['hidden']}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def versus_full_rank(
    hidden_sizes: Sequence[int],
    population: int,
    samples_per_member: int,
    rank: int = 1,
    repeats: int = 3,
    threads: int | None = None,
) -> list[dict[str, float]]:
    """Time and memory of one population evaluation, rank-r noise against dense noise.

    One row per hidden size. ``speedup`` is full-rank seconds over low-rank seconds (noise
    generation and forward both counted); ``noise_bytes_ratio`` is the analytic r(m+n)
    against mn saving. Sizes whose full-rank noise would exceed ``FULL_RANK_LIMIT_BYTES``
    come back with ``skipped`` = 1 and NaN timings: materialising them is the failure mode
    the low-rank form exists to avoid, not something to do to a shared machine.
    ``threads`` as in ``eval_vs_inference`` (set in the subprocess that measures).
    """
    rows: list[dict[str, float]] = []
    for hidden in hidden_sizes:
        model = build_mlp(hidden)
        low_bytes = noise_bytes(model, population, rank, full_rank=False)
        full_bytes = noise_bytes(model, population, rank, full_rank=True)
        row = {
            "hidden": float(hidden),
            "population": float(population),
            "samples_per_member": float(samples_per_member),
            "rank": float(rank),
            "low_noise_bytes": float(low_bytes),
            "full_noise_bytes": float(full_bytes),
            "noise_bytes_ratio": full_bytes / low_bytes,
            "full_rank_limit_bytes": float(FULL_RANK_LIMIT_BYTES),
        }
        if full_bytes > FULL_RANK_LIMIT_BYTES:
            rows.append(
                row
                | {
                    "skipped": 1.0,
                    "threads": NAN,
                    "low_s": NAN,
                    "full_s": NAN,
                    "speedup": NAN,
                    "low_peak_rss_growth_bytes": NAN,
                    "full_peak_rss_growth_bytes": NAN,
                    "peak_rss_ratio": NAN,
                }
            )
            continue
        measured = _run_isolated(
            hidden=hidden,
            members=population,
            samples=samples_per_member,
            rank=rank,
            repeats=repeats,
            threads=threads,
        )
        if (measured["low_noise_bytes"], measured["full_noise_bytes"]) != (low_bytes, full_bytes):
            raise RuntimeError(f"analytic noise bytes disagree with the held noise: {measured}")
        low_rss = measured["low_peak_rss_growth_bytes"]
        full_rss = measured["full_peak_rss_growth_bytes"]
        low_rss_f = float(low_rss) if low_rss > 0 else NAN
        full_rss_f = float(full_rss) if full_rss > 0 else NAN
        rows.append(
            row
            | {
                "skipped": 0.0,
                "threads": float(measured["threads"]),
                "low_s": measured["low_s"],
                "full_s": measured["full_s"],
                "speedup": measured["full_s"] / measured["low_s"],
                "low_peak_rss_growth_bytes": low_rss_f,
                "full_peak_rss_growth_bytes": full_rss_f,
                "peak_rss_ratio": full_rss_f / low_rss_f,
            }
        )
    return rows
