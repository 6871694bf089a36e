"""What a worker hands the controller is on the host, whatever it trained on."""

from __future__ import annotations

import torch

from workers.host import on_host


def test_on_host_keeps_the_structure_and_the_values():
    state = {
        "model": {"w": torch.ones(2, dtype=torch.float16)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
        "pair": (torch.zeros(1), "name"),
        "rng": [torch.arange(3), 7],
    }
    moved = on_host(state)
    assert moved["model"]["w"].dtype == torch.float16
    assert torch.equal(moved["model"]["w"], state["model"]["w"])
    assert moved["optimizer"]["param_groups"] == [{"lr": 0.1}]
    assert float(moved["optimizer"]["state"][0]["step"]) == 3.0
    assert isinstance(moved["pair"], tuple) and moved["pair"][1] == "name"
    assert isinstance(moved["rng"], list) and moved["rng"][1] == 7
    assert all(t.device.type == "cpu" for t in (moved["pair"][0], moved["rng"][0]))
