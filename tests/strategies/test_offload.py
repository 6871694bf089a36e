"""Activation offloading (strategies.engines.offload): the gradients it gives are those
without it, bit for bit; its files go; small tensors and parameters stay; the writes run
behind the forward and never deadlock; the telemetry meter counts only what stays; the
config refuses what cannot work; every engine kind offloads; a backprop run on local Ray
trains with ``engine.offload_activations: disk``."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from torch import nn

import unlocked
from orchestrator.config import EngineConfig, validate_mapping
from orchestrator.errors import ConfigError
from strategies.engines import offload as offload_module
from strategies.engines.base import build_engine
from strategies.engines.offload import ActivationOffload, layered_saved_tensors_hooks
from tests.conftest import small_config
from workers.telemetry import StepMemory


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)
    )


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


NETWORKS = {"mlp": (mlp, (16, 12)), "conv": (conv_net, (4, 3, 8, 8))}


def gradients(network: nn.Module, shape: tuple[int, ...], offload: ActivationOffload | None):
    torch.manual_seed(1)
    x, y = torch.randn(shape), torch.randint(0, 5, (shape[0],))
    network.zero_grad()
    saving = offload.saving() if offload is not None else torch.enable_grad()
    with saving:
        loss = nn.functional.cross_entropy(network(x), y)
    loss.backward()
    return [p.grad.clone() for p in network.parameters()]


@pytest.mark.parametrize("name", NETWORKS)
def test_disk_offload_gives_the_same_gradients_bit_for_bit(name, tmp_path):
    build, shape = NETWORKS[name]
    expected = gradients(build(), shape, None)
    offload = ActivationOffload("disk", "cpu", min_bytes=0, directory=str(tmp_path))
    got = gradients(build(), shape, offload)
    assert offload.offloaded_bytes > 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    offload.close()


def test_files_are_removed_after_the_backward_and_the_directory_on_close(tmp_path):
    offload = ActivationOffload("disk", "cpu", min_bytes=0, directory=str(tmp_path))
    gradients(mlp(), (16, 12), offload)
    gc.collect()
    assert offload.directory is not None and offload.directory.is_dir()
    # A handle freed while its write is still going removes the file when the write ends,
    # on the writer's thread: give the last writes a moment.
    deadline = time.monotonic() + 5.0
    while list(offload.directory.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(offload.directory.iterdir()) == []
    network, x = mlp(), torch.randn(16, 12)
    with offload.saving():
        kept = network(x).sum()  # a graph not yet backpropagated: its files are on disk
    for _, wait in offload.sending:
        wait()
    assert list(offload.directory.iterdir())
    offload.close()
    assert not offload.directory.exists()
    offload.close()  # idempotent
    del kept


def test_small_tensors_and_parameters_stay_in_memory(tmp_path):
    offload = ActivationOffload("disk", "cpu", min_bytes=10**9, directory=str(tmp_path))
    gradients(mlp(), (16, 12), offload)
    assert offload.offloaded_bytes == 0
    every = ActivationOffload("disk", "cpu", min_bytes=0, directory=str(tmp_path))
    weight = nn.Parameter(torch.randn(64, 64))
    assert every.pack(weight) is weight
    assert isinstance(every.pack(weight.t()), torch.Tensor)  # a view of a parameter
    assert not isinstance(every.pack(torch.randn(64, 64)), torch.Tensor)
    offload.close()
    every.close()


def test_a_retained_graph_can_be_unpacked_twice(tmp_path):
    network, x = mlp(), torch.randn(16, 12)
    offload = ActivationOffload("disk", "cpu", min_bytes=0, directory=str(tmp_path))
    with offload.saving():
        loss = network(x).square().mean()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in network.parameters()]
    loss.backward()
    assert all(torch.equal(2 * a, p.grad) for a, p in zip(once, network.parameters(), strict=True))
    offload.close()


def test_a_pack_returns_before_its_write_and_a_pending_tensor_is_forwarded(tmp_path, monkeypatch):
    """The write runs behind the forward: held up on purpose, it does not hold up the pack,
    and an unpack before it ends gets the tensor still in memory without waiting."""
    release = threading.Event()
    write = offload_module._write

    def held_write(staged, path):  # noqa: ANN001, ANN202
        assert release.wait(timeout=10)
        write(staged, path)

    monkeypatch.setattr(offload_module, "_write", held_write)
    offload = ActivationOffload("disk", "cpu", min_bytes=0, directory=str(tmp_path))
    tensor = torch.randn(32, 32)
    handle = offload.pack(tensor)
    assert not handle.written.done()
    assert torch.equal(offload.unpack(handle), tensor)
    release.set()
    handle.written.result(timeout=10)
    assert torch.equal(offload.unpack(handle), tensor)  # now read back from its file
    offload.close()


def test_a_long_forward_with_a_slow_disk_finishes_with_at_most_window_writes_pending(
    tmp_path, monkeypatch
):
    write = offload_module._write
    pending = []

    def slow_write(staged, path):  # noqa: ANN001, ANN202
        time.sleep(0.002)
        write(staged, path)

    monkeypatch.setattr(offload_module, "_write", slow_write)
    offload = ActivationOffload("disk", "cpu", min_bytes=0, directory=str(tmp_path))
    torch.manual_seed(0)
    network = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(30)])
    result: list[list[torch.Tensor]] = []

    def train() -> None:
        with offload.saving():
            loss = network(torch.randn(8, 16)).sum()
            pending.append(sum(not done() for done, _ in offload.sending))
        loss.backward()
        result.append([p.grad for p in network.parameters()])

    worker = threading.Thread(target=train, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "offloaded forward/backward deadlocked"
    assert result and all(g is not None for g in result[0])
    assert pending[0] <= offload_module.WINDOW
    offload.close()


def test_layered_hooks_pack_innermost_first_and_unpack_outermost_first():
    calls: list[str] = []

    def layer(name: str):  # noqa: ANN202
        def pack(value):  # noqa: ANN001, ANN202
            calls.append(f"pack {name}")
            return value

        def unpack(value):  # noqa: ANN001, ANN202
            calls.append(f"unpack {name}")
            return value

        return pack, unpack

    x = torch.randn(3, requires_grad=True)
    with layered_saved_tensors_hooks(*layer("outer")):
        with layered_saved_tensors_hooks(*layer("inner")):
            y = x.exp()  # exp saves its result once
        z = y.sum()
    z.backward()
    assert calls == ["pack inner", "pack outer", "unpack outer", "unpack inner"]
    assert offload_module._layers.stack == []


def test_the_memory_meter_counts_only_what_the_offload_keeps(tmp_path):
    network, x = conv_net(), torch.randn(4, 3, 8, 8)
    everything = StepMemory("cpu")
    with everything.backprop():
        network(x).sum().backward()
    metered = StepMemory("cpu")
    offload = ActivationOffload("disk", "cpu", min_bytes=512, directory=str(tmp_path))
    kept: list[int] = []

    def probe(tensor: torch.Tensor) -> torch.Tensor:  # innermost: sees every saved tensor
        kept.append(tensor.nbytes if offload.keeps(tensor) else 0)
        return tensor

    with metered.backprop(), offload.saving(), layered_saved_tensors_hooks(probe, lambda t: t):
        loss = network(x).sum()
    loss.backward()
    assert offload.offloaded_bytes > 0
    assert 0 < metered.saved == sum(kept) < everything.saved
    offload.close()


def engine_config(**fields: object) -> EngineConfig:
    return EngineConfig.model_validate(fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"offload_dir": "/tmp"}, "engine.offload_dir: '/tmp' applies to offload_activations"),
        ({"offload_min_bytes": 10}, "engine.offload_min_bytes: 10 applies only when"),
        ({"offload_activations": "ssd"}, "offload_activations"),
        ({"offload_activations": "disk", "offload_min_bytes": -1}, "offload_min_bytes"),
    ],
)
def test_the_config_refuses_offload_fields_that_cannot_apply(fields, message, tmp_path):
    raw = {
        "strategy": {"kind": "backprop", "batches_per_step": 4},
        "data": {"dataset": "digits", "root": str(tmp_path)},
        "engine": fields,
    }
    with pytest.raises(ConfigError, match=message):
        validate_mapping(raw)


def test_an_engine_refuses_host_offload_without_a_gpu_and_a_missing_directory():
    network = mlp()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="'host' on a worker whose device is 'cpu'"):
        build_engine(engine_config(offload_activations="host"), [network], optimizer, "cpu")
    missing = engine_config(offload_activations="disk", offload_dir="/nonexistent/offload")
    with pytest.raises(ConfigError, match="engine.offload_dir: '/nonexistent/offload'"):
        build_engine(missing, [network], optimizer, "cpu")


@pytest.mark.parametrize(
    "kind", ["torch", "accelerate", pytest.param("deepspeed", marks=pytest.mark.slow)]
)
def test_every_engine_kind_offloads_in_its_forward_context(kind, tmp_path):
    def step(fields: dict) -> list[torch.Tensor]:
        network = mlp()
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        engine = build_engine(engine_config(kind=kind, **fields), [network], optimizer, "cpu")
        torch.manual_seed(1)
        x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
        with engine.autocast():
            loss = nn.functional.cross_entropy(engine.modules[0](x), y)
        engine.update(loss)
        if engine.offload is not None:
            assert engine.offload.offloaded_bytes > 0
            engine.close()
        return [p.detach().clone() for p in network.parameters()]

    offloaded = {
        "offload_activations": "disk",
        "offload_dir": str(tmp_path),
        "offload_min_bytes": 0,
    }
    assert all(torch.equal(a, b) for a, b in zip(step(offloaded), step({}), strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["host", "disk"])
@pytest.mark.parametrize("name", NETWORKS)
def test_cuda_offload_gives_the_same_gradients_bit_for_bit(where, name, tmp_path):
    build, shape = NETWORKS[name]

    def cuda_gradients(offload: ActivationOffload | None) -> list[torch.Tensor]:
        network = build().cuda()
        torch.manual_seed(1)
        x, y = torch.randn(shape).cuda(), torch.randint(0, 5, (shape[0],)).cuda()
        saving = offload.saving() if offload is not None else torch.enable_grad()
        with saving:
            loss = nn.functional.cross_entropy(network(x), y)
        loss.backward()
        torch.cuda.synchronize()
        return [p.grad.cpu() for p in network.parameters()]

    torch.backends.cudnn.deterministic = True
    expected = cuda_gradients(None)
    offload = ActivationOffload(where, "cuda", min_bytes=0, directory=str(tmp_path))
    got = cuda_gradients(offload)
    assert offload.offloaded_bytes > 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    offload.close()


def test_backprop_trains_with_activations_offloaded_to_disk(ray_local, tmp_path, dataset_root):
    """About 5 s on 2 cores: 4 steps of the digits MLP, its activations on disk."""
    offload_dir = tmp_path / "offload"
    offload_dir.mkdir()
    raw = small_config(
        tmp_path,
        dataset_root,
        tracking={"enabled": False},
        stop={"max_steps": 4},
        eval={"every": 4},
        engine={
            "offload_activations": "disk",
            "offload_dir": str(offload_dir),
            "offload_min_bytes": 1024,
        },
    )
    raw["strategy"] = {"kind": "backprop", "batches_per_step": 4, "optimizer": {"lr": 0.003}}
    result = unlocked.run(raw)
    losses = [metrics["train/loss"] for _, metrics in result.history]
    assert losses[-1] < losses[0]
    assert result.metrics["eval/accuracy"] > 0.3  # chance: 0.1
    assert list(offload_dir.glob("unlocked-offload-*"))  # the worker offloaded
    leftovers = [path for path in offload_dir.rglob("*") if path.is_file()]
    assert leftovers == []


def test_a_tensor_saved_twice_is_sent_once(tmp_path):
    offload = ActivationOffload("disk", "cpu", min_bytes=0, directory=str(tmp_path))
    x = torch.randn(64, 64, requires_grad=True)
    with offload.saving():
        hidden = x.relu()  # saves its output, which mul saves twice more
        loss = (hidden * hidden).sum()
    loss.backward()
    assert offload.count == 1
    assert torch.equal(x.grad, 2 * x.relu() * (x > 0))
    offload.close()


@pytest.mark.gpu
def test_host_offload_lowers_the_cuda_allocator_peak():
    """Eight 1024-wide layers on 2048 rows save about 72 MB; offloaded to pinned host
    memory, at most a window of them is on the device at once."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()) for _ in range(8)]
    network = nn.Sequential(*layers).cuda()
    x = torch.randn(2048, 1024, device="cuda")

    def peak_above_start(offload: ActivationOffload | None) -> int:
        network(x).sum().backward()  # gradients allocated: the start holds them
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        saving = offload.saving() if offload is not None else torch.enable_grad()
        with saving:
            loss = network(x).square().mean()
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    kept = peak_above_start(None)
    offload = ActivationOffload("host", "cuda", min_bytes=0)
    assert peak_above_start(offload) < 0.6 * kept
