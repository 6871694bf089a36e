"""DeepSpeed: ZeRO stage 1 (optimizer state partitioned) or 2 (gradients too), optionally
with the optimizer state offloaded to CPU memory, for a block whose optimizer state is large.

Mixed precision is DeepSpeed's ``torch_autocast`` mode: fp32 weights (the ZeRO optimizer's
fp32 partitions are the masters), bf16/fp16 compute under its autocast context, and for
fp16 the ZeRO optimizer's own gradient scaler. Its ``bf16``/``fp16`` sections instead cast
every weight and buffer to 16 bits, which normalisation layers fed by autocast cannot mix
with (BatchNorm on a CPU: "expected scalar type BFloat16 but found Float").

Each worker is its own process, so its engine is a DeepSpeed world of one: gloo on a CPU
(DeepSpeed's CPU accelerator), nccl on CUDA, on a free loopback port of its own. The ZeRO
optimizer's state dict holds live objects (its loss scaler, a stage enum, parameter
fragment maps); ``state()`` keeps its tensors and plain data and ``load()`` puts the live
objects back, so a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from strategies.engines.base import Engine, keeping_threads

if TYPE_CHECKING:
    from orchestrator.config import EngineConfig

_LOSS_SCALER = "loss_scaler"
_ZERO_STAGE = "zero_stage"
_FRAGMENT_MAPS = "param_slice_mappings"  # rebuilt by the engine; read only by universal checkpoints
_PLAIN = (bool, int, float, str, type(None), torch.Tensor)
_AUTOCAST = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed with the accelerator the device needs: its CPU accelerator must be
    chosen before the first import, which otherwise probes for a GPU."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


@contextlib.contextmanager
def _world_of_one() -> Iterator[None]:
    """The variables of a single-rank process group's rendezvous, while DeepSpeed joins
    (it reads them even when the process has its group already).

    They are removed afterwards: left in the process, they would tell any later library
    (Accelerate in the same test process, or a Ray worker started from it, which inherits
    them) that it belongs to this world.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wanted = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    added = [key for key in wanted if key not in os.environ]
    os.environ.update({key: wanted[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def ds_config(config: EngineConfig) -> dict[str, Any]:
    """The DeepSpeed config of an ``engine`` section."""
    zero: dict[str, Any] = {"stage": config.stage}
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        # DeepSpeed reads no batches here; its batch size only feeds its own logging.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": config.grad_accumulation,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the run's own torch optimizer
        "zero_force_ds_cpu_optimizer": False,  # offload keeps it (no compiled CPU Adam)
        "torch_autocast": {
            "enabled": config.precision != "fp32",
            "dtype": _AUTOCAST[config.precision],
        },
        "steps_per_print": 2**62,
    }


class DeepSpeedEngine(Engine):
    def __init__(
        self,
        modules: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
        config: EngineConfig,
        device: str,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(modules, optimizer, config, device, skip_nonfinite)
        deepspeed = _deepspeed(self.device)
        with _world_of_one(), keeping_threads():
            self.engine, *_ = deepspeed.initialize(
                model=nn.ModuleList(self.modules),
                optimizer=optimizer,
                config=ds_config(config),
                dist_init_required=True,
            )
        # ZeRO's own check (on by default only for its fp16/bf16 sections) drops a step
        # whose gradient partitions hold NaN/inf and zeroes them: the skip, done where the
        # partitions are. fp16's scaler drops overflowing steps itself (routine scaling).
        scaler = self.engine.optimizer.torch_autocast_gradscaler
        self.zero_checks = skip_nonfinite and scaler is None
        if self.zero_checks:
            self.engine.optimizer.check_grad_overflow = True

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        with autocast_if_enabled(self.engine):
            yield

    def update(self, loss: torch.Tensor, measure_norm: bool = False) -> bool:
        closes = self.engine.is_gradient_accumulation_boundary()
        # Every batch is backpropagated, a non-finite one too: ZeRO reduces the gradients
        # inside backward, and its overflow check then drops the whole window's step.
        self._admits(loss)
        self.engine.backward(loss)  # divides by grad_accumulation
        self.engine.step()  # steps the ZeRO optimizer where the window closes
        if measure_norm and closes:  # ZeRO measures it in every step
            self.grad_norm = float(self.engine.get_global_grad_norm())
        if closes:
            dropped = self.zero_checks and self.engine.optimizer.overflow
            self._skips(math.inf if dropped else 0.0)
        return self._advance(closes)

    def _state(self) -> dict[str, Any]:
        saved = self.engine.optimizer.state_dict()
        saved.pop(_FRAGMENT_MAPS, None)
        saved[_ZERO_STAGE] = int(saved[_ZERO_STAGE])
        scaler = saved[_LOSS_SCALER]
        saved[_LOSS_SCALER] = {k: v for k, v in vars(scaler).items() if isinstance(v, _PLAIN)}
        counters = {
            "global_steps": self.engine.global_steps,
            "micro_steps": self.engine.micro_steps,
        }
        state = {"optimizer": saved, "counters": counters}
        scaler = self.engine.optimizer.torch_autocast_gradscaler  # fp16's, not in its state
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def load(self, state: dict[str, Any]) -> None:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        zero = self.engine.optimizer
        saved = dict(state["optimizer"])
        for key, value in saved[_LOSS_SCALER].items():
            setattr(zero.loss_scaler, key, value)
        saved[_LOSS_SCALER] = zero.loss_scaler
        saved[_ZERO_STAGE] = ZeroStageEnum(saved[_ZERO_STAGE])
        # The fp32 master partitions come from the checkpoint, not from the (maybe bf16)
        # module weights, so training continues exactly.
        zero.load_state_dict([saved], load_optimizer_states=True, load_from_fp32_weights=True)
        for key, value in state["counters"].items():
            setattr(self.engine, key, int(value))
        if zero.torch_autocast_gradscaler is not None:
            zero.torch_autocast_gradscaler.load_state_dict(state["scaler"])
