"""The compiled-graph transport between GPU blocks: NCCL device to device (needs CUDA).

With one GPU per block the blocks hand each other CUDA tensors over NCCL; blocks that share
a GPU (fractional ``gpus_per_worker``) go through the host, since NCCL has one rank per
device. Either way a run ends on the object store's numbers.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import small_config

pytestmark = pytest.mark.gpu


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run(tmp_path, dataset_root, transport: str, gpus_per_worker: float):
    import unlocked

    raw = small_config(
        tmp_path / f"{transport}-{gpus_per_worker}",
        dataset_root,
        strategy={"blocks": 2, "transport": transport, "max_in_flight": 2},
        resources={"cpus_per_worker": 1, "gpus_per_worker": gpus_per_worker},
        tracking={"enabled": False},
        stop={"max_steps": 4},
    )
    return unlocked.run(raw)  # the session's local Ray (ray_local) finds the GPUs itself


@pytest.mark.timeout(300)
@pytest.mark.parametrize("gpus_per_worker", [1.0, 0.5], ids=["nccl", "shared-gpu"])
def test_gpu_blocks_end_on_the_object_store_numbers(
    ray_local, tmp_path, dataset_root, gpus_per_worker: float
):
    if gpus() < 2 * gpus_per_worker:
        pytest.skip(f"needs {2 * gpus_per_worker:g} GPUs, this machine has {gpus()}")
    store = run(tmp_path, dataset_root, "object_store", gpus_per_worker)
    compiled = run(tmp_path, dataset_root, "compiled_graph", gpus_per_worker)
    for key in ("eval/accuracy", "eval/loss", "train/loss"):
        assert compiled.metrics[key] == pytest.approx(store.metrics[key], rel=1e-5), key


@pytest.mark.timeout(300)
def test_nccl_moves_an_activation_between_two_gpu_actors(ray_local):
    if gpus() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {gpus()}")
    from benchmarks.transport import relay_mb_s

    assert relay_mb_s("compiled_graph", 512 * 1024, 20, gpu=True) > 0
