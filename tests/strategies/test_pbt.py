"""PBT end to end on a local Ray: exploits and lineage, PBT over the pipeline, a killed
trial, and the winner's schedule replayed as a single run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

import unlocked
from orchestrator.cli import main
from orchestrator.config import validate_mapping
from orchestrator.controller import Controller
from orchestrator.errors import ConfigError
from orchestrator.schedule import load_schedule
from strategies.backprop.driver import BackpropStrategy
from strategies.eggroll.driver import EggrollStrategy
from strategies.pipeline.driver import PipelineStrategy
from tests.conftest import on_step, small_config, write_config

BACKPROP = {"kind": "backprop", "batches_per_step": 3, "optimizer": {"kind": "sgd", "lr": 0.01}}


def pbt_config(tmp_path: Path, dataset_root: Path, **strategy: Any) -> dict[str, Any]:
    section = {
        "kind": "pbt",
        "population": 4,
        "interval": 2,
        "concurrent_trials": 2,
        "quantile_fraction": 0.25,
        "search_space": {"lr": {"loguniform": [1e-4, 0.5]}},
        "inner": BACKPROP,
        **strategy,
    }
    raw = small_config(
        tmp_path,
        dataset_root,
        model={"hidden": [32, 32]},
        stop={"max_steps": 6},
        eval={"every": 2},
        checkpoint={"every": 3},
    )
    raw["strategy"] = section  # not merged into the default pipeline section
    return raw


def parent_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return client, parents[0], children


def artifact(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp_path / "artifacts"))).read_text()


# -- config ---------------------------------------------------------------------------
def test_a_search_key_the_inner_strategy_lacks_lists_the_ones_it_has(tmp_path, dataset_root):
    raw = pbt_config(tmp_path, dataset_root, search_space={"momentum": {"uniform": [0, 1]}})
    with pytest.raises(ConfigError, match=r"\['momentum'\] are not hyperparameters.*\['lr'\]"):
        validate_mapping(raw)
    pipeline = {"kind": "pipeline", "blocks": 2}
    raw = pbt_config(tmp_path, dataset_root, inner=pipeline)
    with pytest.raises(ConfigError, match=r"it has \['lr/block-0', 'lr/block-1'\]"):
        validate_mapping(raw)


def test_inner_errors_name_their_path(tmp_path, dataset_root):
    raw = pbt_config(tmp_path, dataset_root, inner={**BACKPROP, "optimizer": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"strategy\.inner\.optimizer\.lr: Input should be"):
        validate_mapping(raw)
    raw = pbt_config(
        tmp_path,
        dataset_root,
        inner={"kind": "pipeline", "blocks": 5},
        search_space={"lr/block-0": {"uniform": [0.001, 0.01]}},
    )
    with pytest.raises(ConfigError, match=r"strategy\.inner\.blocks: 5 blocks"):
        validate_mapping(raw)
    with pytest.raises(ConfigError, match="concurrent_trials 5 exceeds population 4"):
        validate_mapping(pbt_config(tmp_path, dataset_root, concurrent_trials=5))
    with pytest.raises(ConfigError, match=r"strategy\.inner: .*a PBT trial cannot itself be PBT"):
        validate_mapping(pbt_config(tmp_path, dataset_root, inner={"kind": "pbt"}))


def test_declared_hyperparameter_names_match_the_strategies():
    backprop = BackpropStrategy(BackpropStrategy.Config())
    assert list(backprop.hyperparameters()) == backprop.config.hyperparameter_names()
    pipeline = PipelineStrategy(PipelineStrategy.Config(blocks=3))
    assert list(pipeline.hyperparameters()) == pipeline.config.hyperparameter_names()
    eggroll = EggrollStrategy(EggrollStrategy.Config())
    eggroll.ctx = SimpleNamespace(config=SimpleNamespace(stop=SimpleNamespace(max_steps=10)))
    assert list(eggroll.hyperparameters()) == eggroll.config.hyperparameter_names()


def test_slots_follow_the_cluster_when_not_given(tmp_path, dataset_root):
    config = validate_mapping(pbt_config(tmp_path, dataset_root, concurrent_trials=None)).strategy
    assert config.num_workers() == 1
    assert config.workers_that_fit({"CPU": 3.0}, 1.0, 0.0) == 3
    assert config.workers_that_fit({"CPU": 64.0}, 1.0, 0.0) == 4  # at most the population
    assert config.workers_that_fit({"CPU": 0.5}, 1.0, 0.0) == 1
    assert config.workers_that_fit({"CPU": 8.0, "GPU": 1.0}, 1.0, 0.5) == 2


# -- end to end -------------------------------------------------------------------------
@pytest.mark.slow
def test_pbt_exploits_keeps_a_consistent_lineage_and_its_schedule_replays(
    ray_local, tmp_path, dataset_root
):
    result = unlocked.run(pbt_config(tmp_path, dataset_root))
    assert result.step == 6 and result.metrics["train/segments"] == 24
    assert result.metrics["train/exploits"] >= 1

    client, parent, children = parent_run(tmp_path)
    run_id = parent.info.run_id
    assert {f"trial-{i}" for i in range(4)} <= set(children)
    history = client.get_metric_history(children["trial-0"].info.run_id, "train/hp/lr")
    assert len(history) >= 3 and all(1e-4 <= m.value <= 0.5 for m in history)

    events = json.loads(artifact(client, run_id, "pbt/exploits.json", tmp_path))
    trials = json.loads(artifact(client, run_id, "pbt/trials.json", tmp_path))
    assert len(events) == result.metrics["train/exploits"]
    for event in events:
        assert event["donor"] != event["trial"]
        assert {event["donor"], event["trial"]} <= {0, 1, 2, 3}
        assert event["donor_score"] >= event["score"]  # the copier ranked below its donor
        assert 1e-4 <= event["new"]["lr"] <= 0.5
    for trial in trials:  # the last exploit of a trial set its current values
        last = [e for e in events if e["trial"] == trial["trial"]]
        if last:
            assert trial["hyperparameters"] == last[-1]["new"]
    artifacts = {a.path for a in client.list_artifacts(run_id, "pbt")}
    assert {"pbt/lineage.png", "pbt/winner_schedule.yaml", "pbt/slot_timeline.png"} <= artifacts

    # The winner's schedule, replayed as one run, lands on the winner's score.
    text = artifact(client, run_id, "pbt/winner_schedule.yaml", tmp_path)
    schedule_file = tmp_path / "winner.yaml"
    schedule_file.write_text(text)
    document = yaml.safe_load(text)
    winner = max(trials, key=lambda t: t["score"] if t["score"] is not None else -1)
    assert document["source"]["trial"] == winner["trial"]
    assert result.metrics["eval/accuracy"] == pytest.approx(winner["score"])
    schedule, raw = load_schedule(schedule_file)
    replay = Controller(validate_mapping(raw), schedule=schedule).run()
    assert replay.step == winner["step"]
    assert replay.metrics["eval/accuracy"] == pytest.approx(winner["score"], abs=1e-9)


@pytest.mark.slow
def test_the_best_trial_beats_the_median_of_its_initial_hyperparameters(
    ray_local, tmp_path, dataset_root
):
    """Random search is the same population with exploit turned off (quantile 0)."""
    scores = {}
    for name, quantile in (("pbt", 0.25), ("random", 0.0)):
        raw = pbt_config(tmp_path / name, dataset_root, quantile_fraction=quantile)
        raw["tracking"]["enabled"] = False
        raw["run"]["name"] = name
        result = unlocked.run(raw)
        scores[name] = result
    assert scores["random"].metrics["train/exploits"] == 0
    assert scores["pbt"].metrics["train/exploits"] >= 1
    random_median = scores["random"].metrics["train/median_score"]
    assert scores["pbt"].metrics["train/best_score"] > random_median


@pytest.mark.slow
def test_pbt_over_the_pipeline_time_slices_two_trials_on_one_slot(
    ray_local, tmp_path, dataset_root
):
    raw = pbt_config(
        tmp_path,
        dataset_root,
        population=2,
        concurrent_trials=1,
        quantile_fraction=0.5,
        inner={"kind": "pipeline", "blocks": 2, "batches_per_step": 3, "aux_head": "linear"},
        search_space={
            "lr/block-0": {"loguniform": [1e-4, 1e-2]},
            "lr/block-1": {"loguniform": [1e-4, 1e-2]},
        },
    )
    raw["stop"]["max_steps"] = 3
    result = unlocked.run(raw)
    assert result.metrics["train/segments"] == 6
    assert result.metrics["system/switch_overhead"] > 0  # trials took turns on the one slot
    assert 0.0 < result.metrics["eval/accuracy"] <= 1.0
    assert set(result.peak_training_bytes) == {"slot-0/block-0", "slot-0/block-1"}


def test_pbt_over_a_resnet_pipeline_exploits_between_conv_net_trials(
    ray_local, tmp_path, dataset_root
):
    """A trial's state (conv weights, batch norm's running statistics, both blocks'
    optimizers) is what an exploit copies; the population trains and evaluates images."""
    raw = pbt_config(
        tmp_path,
        dataset_root,
        population=2,
        quantile_fraction=0.5,
        synchronous=True,  # the worse trial always exploits after the first round
        inner={"kind": "pipeline", "blocks": 2, "batches_per_step": 3, "aux_head": "augmented"},
        search_space={"lr/block-0": {"loguniform": [1e-4, 1e-2]}},
    )
    raw["model"] = {"kind": "resnet", "blocks_per_stage": 1, "width": 8}
    raw["data"] = {"dataset": "digits-images", "batch_size": 64, "root": str(dataset_root)}
    raw["tracking"] = {"enabled": False}
    raw["stop"]["max_steps"] = 4
    result = unlocked.run(raw)
    assert result.metrics["train/exploits"] >= 1
    assert 0.1 < result.metrics["eval/accuracy"] <= 1.0  # chance: 0.1


@pytest.mark.slow
def test_pbt_over_eggroll_tunes_sigma_and_lr_without_data(ray_local, tmp_path, dataset_root):
    raw = pbt_config(
        tmp_path,
        dataset_root,
        population=2,
        metric="eval/return",
        inner={
            "kind": "eggroll",
            "population": 16,
            "workers": 1,
            "task": {"kind": "gym", "env": "CartPole-v1", "hidden": [8], "eval_episodes": 2},
        },
        search_space={"sigma": {"loguniform": [0.02, 0.3]}, "lr": {"uniform": [0.01, 0.1]}},
    )
    del raw["data"]
    raw["stop"]["max_steps"] = 2
    result = unlocked.run(raw)
    assert result.metrics["train/segments"] == 4
    assert result.metrics["eval/return"] > 0
    for trial in (0, 1):
        if f"trial-{trial}/train/hp/sigma" in result.metrics:
            assert 0.02 <= result.metrics[f"trial-{trial}/train/hp/sigma"] <= 0.3


@pytest.mark.slow
def test_a_killed_trial_worker_is_restored_and_the_population_goes_on(
    ray_local, tmp_path, dataset_root
):
    raw = pbt_config(tmp_path, dataset_root, population=2, quantile_fraction=0.5)
    raw["stop"]["max_steps"] = 4
    killed = []

    def kill(run, step: int, _metrics: dict) -> None:
        run = run.config.run_name
        # First a worker inside slot 0's trial, then slot 1's runner itself.
        victim = {1: f"{run}/slot-0/g0/trainer-0/g0", 2: f"{run}/runner-1/g0"}.get(step)
        if victim is not None:
            ray.kill(ray.get_actor(victim), no_restart=True)
            killed.append(victim)

    result = unlocked.run(raw, callbacks=[on_step(kill)])
    assert len(killed) == 2 and result.step == 4
    # One budget per run: both losses count, though only the slots were rebuilt and the
    # run never went back to a checkpoint.
    assert result.failures == 2 and [s for s, _ in result.history] == [1, 2, 3, 4]
    assert result.metrics["system/slot_failures"] == 2
    assert result.metrics["train/segments"] == 8
    _, parent, _ = parent_run(tmp_path)
    assert parent.data.metrics["system/slot_failures"] == 2


@pytest.mark.slow
def test_synchronous_pbt_resumed_from_a_checkpoint_matches_an_uninterrupted_run(
    ray_local, tmp_path, dataset_root
):
    """Synchronous PBT's decisions do not depend on timing, so a run stopped at step 3 and
    resumed must end exactly where the run that never stopped ends."""

    def config(name: str) -> dict[str, Any]:
        raw = pbt_config(tmp_path, dataset_root, synchronous=True)
        raw["run"]["name"] = name
        raw["tracking"]["enabled"] = False
        return raw

    whole = unlocked.run(config("whole"))

    def interrupt(run, step: int, _metrics: dict) -> None:
        if step == 3:
            run.controller.stop_signal = "SIGTERM"  # as the SIGTERM handler does

    first = unlocked.run(config("split"), callbacks=[on_step(interrupt)])
    assert first.step == 3 and first.stopped_by == "SIGTERM"
    resumed = unlocked.run(config("split"), resume=True)
    assert resumed.step == 6
    keys = [
        k
        for k in whole.metrics
        if k.startswith(("trial-", "eval/", "train/best", "train/exploits"))
        and not k.endswith(("samples_per_s", "busy_fraction"))  # timings
    ]
    assert keys and {k: resumed.metrics[k] for k in keys} == {k: whole.metrics[k] for k in keys}


@pytest.mark.slow
def test_a_run_stopped_early_drops_the_intervals_in_flight_and_exports_the_best(
    ray_local, tmp_path, dataset_root
):
    raw = pbt_config(tmp_path, dataset_root)
    raw["stop"]["target"] = {"metric": "eval/accuracy", "value": 0.0}  # met at step 2
    result = unlocked.run(raw)
    assert result.stopped_by == "target" and result.step == 2
    assert result.metrics["train/segments"] == 8  # the slots had already started more
    client, parent, _ = parent_run(tmp_path)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "model")}
    assert "model/model.pt" in artifacts
    assert set(result.peak_training_bytes) == {"slot-0/trainer-0", "slot-1/trainer-0"}


def test_a_metric_the_trials_do_not_report_is_a_config_error(tmp_path, dataset_root):
    raw = pbt_config(tmp_path, dataset_root, metric="eval/bleu", population=2)
    with pytest.raises(ConfigError, match=r"metric: .eval/bleu. is not a metric.*eval/acc"):
        validate_mapping(raw)


def test_validate_describes_the_population(tmp_path, dataset_root, capsys):
    path = write_config(tmp_path, pbt_config(tmp_path, dataset_root))
    assert main(["validate", str(path)]) == 0
    assert "strategy pbt with 4 backprop trials on 2 slot(s) of 1 worker(s)" in (
        capsys.readouterr().out
    )


def test_replay_needs_exactly_one_of_config_and_schedule(tmp_path, capsys):
    assert main(["run"]) == 2
    assert "not both and not neither" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: something-else\n")
    assert main(["run", "--replay-schedule", str(bad)]) == 2
    assert "not a hyperparameter schedule" in capsys.readouterr().err
