"""Engines (strategies.engines) on a CPU: each learns, accumulates exactly like a plain
torch loop with averaged gradients, runs bf16, and restores its state exactly from a
checkpoint read with ``torch.load(weights_only=True)``; the engine section's config errors."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from orchestrator.config import EngineConfig, validate_mapping
from orchestrator.errors import ConfigError
from strategies.engines.base import Engine, build_engine

ENGINES = {
    "torch": {"kind": "torch"},
    "accelerate": {"kind": "accelerate"},
    "deepspeed-zero1": {"kind": "deepspeed", "zero_stage": 1},
    "deepspeed-zero2": {"kind": "deepspeed", "zero_stage": 2},
    "deepspeed-zero2-offload": {"kind": "deepspeed", "zero_stage": 2, "offload_optimizer": True},
}
MIXED = {
    "accelerate-bf16": {"kind": "accelerate", "precision": "bf16"},
    "deepspeed-bf16": {"kind": "deepspeed", "zero_stage": 2, "precision": "bf16"},
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
        for _ in range(count)
    ]


def engine_for(
    settings: dict[str, Any], optimizer: str = "adam", device: str = "cpu"
) -> tuple[nn.Module, Engine]:
    model = network().to(device)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, build_engine(EngineConfig(**settings), [model], opt, device)


def train(
    model: nn.Module, engine: Engine, data: list, device: str = "cpu"
) -> tuple[list[float], list[bool]]:
    losses, steps = [], []
    for x, y in data:
        with engine.autocast():
            loss = nn.functional.cross_entropy(model(x.to(device)).float(), y.to(device))
        steps.append(engine.update(loss))
        losses.append(float(loss.detach()))
    return losses, steps


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().float().cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("settings", ENGINES.values(), ids=ENGINES.keys())
def test_every_engine_learns(settings, one_thread):
    model, engine = engine_for(settings)
    assert torch.get_num_threads() == 1  # the worker's share of its node, kept
    losses, steps = train(model, engine, batches(1) * 30)
    assert all(steps)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("settings", MIXED.values(), ids=MIXED.keys())
def test_bf16_runs_and_learns_on_a_cpu(settings):
    model, engine = engine_for(settings)
    losses, _ = train(model, engine, batches(1) * 30)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0]


def reference_accumulation(data: list, window: int) -> list[torch.Tensor]:
    """A plain torch loop: the mean gradient of every ``window`` batches, one SGD step."""
    model = network()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, (x, y) in enumerate(data):
        (nn.functional.cross_entropy(model(x), y) / window).backward()
        if (i + 1) % window == 0:
            opt.step()
            opt.zero_grad()
    return weights(model)


@pytest.mark.parametrize("settings", ENGINES.values(), ids=ENGINES.keys())
def test_accumulation_steps_every_n_batches_on_the_mean_gradient(settings):
    data = batches(6)
    model, engine = engine_for({**settings, "grad_accumulation": 3}, optimizer="sgd")
    _, steps = train(model, engine, data[:4])
    assert steps == [False, False, True, False]
    assert engine.pending == 1
    with pytest.raises(RuntimeError, match="into an accumulation window"):
        engine.state()
    train(model, engine, data[4:])
    for got, want in zip(weights(model), reference_accumulation(data, 3)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def through_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("settings", {**ENGINES, **MIXED}.values(), ids={**ENGINES, **MIXED}.keys())
def test_state_round_trip_continues_training_exactly(settings):
    settings = {**settings, "grad_accumulation": 2}
    data = batches(8)
    model, engine = engine_for(settings)
    train(model, engine, data[:4])
    saved = through_checkpoint({"model": model.state_dict(), "engine": engine.state()})
    straight, _ = train(model, engine, data[4:])

    resumed_model, resumed = engine_for(settings)
    resumed_model.load_state_dict(saved["model"])
    resumed.load(saved["engine"])
    again, _ = train(resumed_model, resumed, data[4:])
    assert again == straight
    for got, want in zip(weights(resumed_model), weights(model)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_learning_rate_is_the_optimizers_whatever_wraps_it():
    for settings in ENGINES.values():
        model, engine = engine_for(settings, optimizer="sgd")
        for group in engine.optimizer.param_groups:
            group["lr"] = 0.0
        before = weights(model)
        train(model, engine, batches(2))
        for got, want in zip(weights(model), before):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "settings",
    [
        {"kind": "accelerate", "precision": "fp16"},
        {"kind": "accelerate", "precision": "bf16"},
        {"kind": "deepspeed", "zero_stage": 2, "precision": "fp16"},
        {"kind": "deepspeed", "zero_stage": 1, "precision": "bf16", "offload_optimizer": True},
    ],
    ids=[
        "accelerate-fp16",
        "accelerate-bf16",
        "deepspeed-zero2-fp16",
        "deepspeed-zero1-bf16-offload",
    ],
)
def test_mixed_precision_on_cuda_learns_and_round_trips(settings):
    model, engine = engine_for({**settings, "grad_accumulation": 2}, device="cuda")
    data = batches(1) * 40
    losses, _ = train(model, engine, data, "cuda")
    assert losses[-1] < 0.6 * losses[0]
    saved = through_checkpoint({"model": model.state_dict(), "engine": engine.state()})
    straight, _ = train(model, engine, data[:4], "cuda")
    resumed_model, resumed = engine_for({**settings, "grad_accumulation": 2}, device="cuda")
    resumed_model.load_state_dict(saved["model"])
    resumed.load(saved["engine"])
    assert train(resumed_model, resumed, data[:4], "cuda")[0] == straight


# -- the engine section ---------------------------------------------------------------
def run_config(tmp_path, engine: dict[str, Any], **sections: Any):
    raw = {
        "strategy": {"kind": "backprop", "batches_per_step": 4},
        "data": {"dataset": "digits", "root": str(tmp_path)},
        "engine": engine,
        **sections,
    }
    return validate_mapping(raw)


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"kind": "accelerate", "zero_stage": 2}, "engine.zero_stage applies to DeepSpeed only"),
        (
            {"kind": "torch", "offload_optimizer": True},
            "engine.offload_optimizer applies to DeepSpeed",
        ),
        ({"kind": "torch", "precision": "bf16"}, "set engine.kind: accelerate or deepspeed"),
        ({"kind": "deepspeed", "precision": "fp16"}, "'fp16' needs a GPU"),
        ({"kind": "accelerate", "grad_accumulation": 3}, "3 does not divide the 4 batches"),
        ({"kind": "deepspeed", "zero_stage": 3}, "engine.zero_stage"),
        ({"kind": "jax"}, "engine.kind"),
        ({"offload_activations": "host"}, "'host' saves nothing on CPU workers"),
    ],
)
def test_engine_settings_that_do_not_apply_are_errors(tmp_path, engine, message):
    with pytest.raises(ConfigError, match=message):
        run_config(tmp_path, engine)


def test_fp16_is_accepted_with_a_gpu_per_worker(tmp_path):
    config = run_config(
        tmp_path, {"kind": "accelerate", "precision": "fp16"}, resources={"gpus_per_worker": 1}
    )
    assert config.engine.precision == "fp16"


def test_deepspeed_defaults_to_zero_stage_1(tmp_path):
    assert run_config(tmp_path, {"kind": "deepspeed"}).engine.stage == 1


def test_a_strategy_without_gradient_steps_refuses_an_engine(tmp_path):
    raw = {"strategy": {"kind": "eggroll"}, "engine": {"kind": "accelerate"}}
    with pytest.raises(ConfigError, match="strategy 'eggroll' takes no gradient step"):
        validate_mapping(raw)


def test_pbt_answers_for_its_inner_strategy(tmp_path):
    raw = {
        "strategy": {"kind": "pbt", "inner": {"kind": "backprop", "batches_per_step": 4}},
        "data": {"dataset": "digits", "root": str(tmp_path)},
        "engine": {"kind": "deepspeed", "grad_accumulation": 2},
    }
    assert validate_mapping(raw).engine.grad_accumulation == 2


SKIPPING = {"torch": {"kind": "torch"}, "accelerate": {"kind": "accelerate"}}


def skipping_engine(settings: dict[str, Any], window: int = 1) -> tuple[nn.Module, Engine]:
    model = network()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = EngineConfig(**settings, grad_accumulation=window)
    return model, build_engine(config, [model], opt, "cpu", skip_nonfinite=True)


def poisoned_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, how: str) -> torch.Tensor:
    """A batch's loss: as is, NaN, or finite with a NaN gradient (sqrt at 0 has an infinite
    slope, times 0)."""
    loss = nn.functional.cross_entropy(model(x), y)
    if how == "nan_loss":
        return loss * math.nan
    if how == "nan_grad":
        return loss + torch.sqrt((model[0].weight * 0.0).sum())
    return loss


# DeepSpeed's ZeRO step drops a window whose gradient partitions are not finite (its own
# check, which skipping turns on); the engine counts it.
SKIPPING_ALL = {**SKIPPING, "deepspeed-zero2": {"kind": "deepspeed", "zero_stage": 2}}


@pytest.mark.parametrize("how", ["nan_loss", "nan_grad"])
@pytest.mark.parametrize("settings", SKIPPING_ALL.values(), ids=SKIPPING_ALL.keys())
def test_a_non_finite_update_is_skipped_and_training_goes_on(settings, how):
    model, engine = skipping_engine(settings)
    (x, y), (x2, y2) = batches(2)
    before = weights(model)

    engine.update(poisoned_loss(model, x, y, how))
    assert (engine.skipped, engine.applied) == (1, False)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    engine.update(poisoned_loss(model, x2, y2, "finite"))
    assert (engine.skipped, engine.applied) == (1, True)
    after = weights(model)
    assert not all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(w).all() for w in after)


@pytest.mark.parametrize("settings", SKIPPING.values(), ids=SKIPPING.keys())
def test_without_skip_a_nan_loss_reaches_the_weights(settings):
    model, engine = engine_for(settings)
    (x, y), *_ = batches(1)
    engine.update(poisoned_loss(model, x, y, "nan_loss"))
    assert engine.skipped == 0 and engine.applied
    assert any(torch.isnan(w).any() for w in weights(model))


@pytest.mark.parametrize("settings", SKIPPING.values(), ids=SKIPPING.keys())
def test_a_window_holding_a_non_finite_loss_is_skipped_whole(settings):
    model, engine = skipping_engine(settings, window=2)
    (x, y), (x2, y2), (x3, y3), (x4, y4) = batches(4)
    before = weights(model)
    engine.update(poisoned_loss(model, x, y, "nan_loss"))
    assert engine.update(poisoned_loss(model, x2, y2, "finite"))  # the window closes, unstepped
    assert engine.skipped == 1 and not engine.applied
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))

    engine.update(poisoned_loss(model, x3, y3, "finite"))
    engine.update(poisoned_loss(model, x4, y4, "finite"))  # the next window steps
    assert engine.skipped == 1 and engine.applied
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(model)))


def test_skipping_finite_updates_changes_nothing():
    """The check does not touch a sound run: the same weights as without it."""
    data = batches(4)
    reference, plain = engine_for({"kind": "torch"})
    model, checked = skipping_engine({"kind": "torch"})
    train(reference, plain, data)
    train(model, checked, data)
    assert checked.skipped == 0
    assert all(torch.equal(a, b) for a, b in zip(weights(reference), weights(model)))


FP16_SKIPPING = {
    "accelerate-fp16": {"kind": "accelerate", "precision": "fp16"},
    "deepspeed-zero2-fp16": {"kind": "deepspeed", "zero_stage": 2, "precision": "fp16"},
}


@pytest.mark.gpu
@pytest.mark.parametrize("settings", FP16_SKIPPING.values(), ids=FP16_SKIPPING.keys())
def test_fp16_skips_a_nan_loss_beside_its_loss_scaling(settings):
    """The scaler keeps dropping overflowing steps itself; a NaN loss is counted as a skip
    and leaves the weights as they were, and the next batch steps."""
    model = network().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = build_engine(EngineConfig(**settings), [model], opt, "cuda", skip_nonfinite=True)
    (x, y), (x2, y2) = ((a.cuda(), b.cuda()) for a, b in batches(2))
    before = weights(model)
    with engine.autocast():
        loss = poisoned_loss(model, x, y, "nan_loss")
    engine.update(loss.float())
    assert (engine.skipped, engine.applied) == (1, False)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    with engine.autocast():
        loss = poisoned_loss(model, x2, y2, "finite")
    engine.update(loss.float())
    assert engine.skipped == 1 and all(torch.isfinite(w).all() for w in weights(model))
