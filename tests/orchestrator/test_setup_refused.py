"""A worker whose constructor raises a UserError stops the run at once with that message
(exit 2), uncharged and not retried: Ray hands the driver only a dead actor's text, which
``SetupRefused`` makes carry the error."""

from __future__ import annotations

import logging
import pickle
import traceback

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from orchestrator.checkpoint import CheckpointError
from orchestrator.cli import main
from orchestrator.errors import ConfigError, UserError
from orchestrator.recovery import FailureBudget, SetupRefused, refused_setup
from tests.conftest import small_config, write_config


def died_in_init(error: Exception) -> ActorDiedError:
    """What ``ray.get`` raises on the driver after an actor's ``__init__`` raised
    ``error``: Ray's own error, pickled and read back (only its text survives)."""
    try:
        raise error
    except Exception as raised:
        task_error = RayTaskError(
            "Worker.__init__",
            traceback.format_exc(),
            raised,
            proctitle="ray::Worker.__init__",
            pid=1,
            ip="127.0.0.1",
        )
    return pickle.loads(pickle.dumps(ActorDiedError(task_error)))


MESSAGE = "model.module 'nets:f': cannot import 'nets' (No module \"nets\")\n  on every worker"


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (ConfigError(MESSAGE), ConfigError),
        (UserError(MESSAGE), UserError),
        (CheckpointError(MESSAGE), UserError),  # a subclass comes back as its known base
    ],
)
def test_a_refused_setup_comes_back_as_the_users_error(raised, kind):
    err = died_in_init(SetupRefused.carrying(raised))
    assert err.actor_init_failed
    mistake = refused_setup(err)
    assert type(mistake) is kind and str(mistake) == str(raised)


@pytest.mark.parametrize(
    "err",
    [
        died_in_init(RuntimeError("CUDA error: out of memory")),  # a bug or the node's fault
        ActorDiedError(),  # the process died
        RuntimeError("unlocked: a worker's setup refused its input: {}"),
    ],
    ids=["other-init-error", "died", "not-ray"],
)
def test_any_other_loss_is_not_a_refused_setup(err):
    assert refused_setup(err) is None


def test_a_refused_setup_is_raised_and_not_charged():
    budget = FailureBudget(limit=3)
    with pytest.raises(ConfigError, match="cannot import"):
        budget.charge(
            died_in_init(SetupRefused.carrying(ConfigError(MESSAGE))), "step 1", "rebuilding"
        )
    assert budget.failures == 0


@pytest.mark.slow
def test_a_custom_module_a_worker_cannot_import_stops_the_run_with_exit_2(
    ray_local, tmp_path, dataset_root, capsys, caplog, monkeypatch, restored_logging
):
    """The module is on the driver's path only (the checks before Ray pass), as on a
    cluster whose job did not ship it: every worker's constructor refuses."""
    module = tmp_path / "driver_only_nets"
    module.mkdir()
    (module / "driver_only_units.py").write_text(
        "from torch import nn\n\n\n"
        "def units(spec):\n"
        "    return [nn.Linear(spec.shape[0], 16), nn.ReLU(), nn.Linear(16, spec.num_classes)]\n"
    )
    monkeypatch.syspath_prepend(str(module))
    raw = small_config(tmp_path, dataset_root, tracking={"enabled": False})
    raw["strategy"] = {"kind": "backprop", "batches_per_step": 2}
    raw["model"] = {"kind": "custom", "module": "driver_only_units:units"}
    path = write_config(tmp_path, raw)

    with caplog.at_level(logging.WARNING, logger="unlocked"):
        assert main(["run", str(path)]) == 2
    [message] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert message.startswith(
        "error: model.module 'driver_only_units:units': cannot import 'driver_only_units'"
    )
    assert not [m for m in caplog.messages if "worker lost" in m], "charged and retried"
