"""The ES tasks: fitness depends on a member's own perturbation alone, generations change the
episodes or batches, and each task's model and metrics behave as its kind promises."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from pydantic import TypeAdapter

from orchestrator.config import DataConfig
from orchestrator.data.corpus import generated_corpus
from orchestrator.data.source import DatasetInfo, resolve_dataset
from orchestrator.data.stream import BatchStream
from orchestrator.errors import ConfigError
from strategies.config import ModelConfig
from strategies.eggroll.lowrank import NoiseSpec, es_parameters, member_noise, population
from strategies.eggroll.tasks.base import ESTask, build_task
from strategies.eggroll.tasks.char_lm import CharLMTask
from strategies.eggroll.tasks.configs import (
    CharLMTaskConfig,
    ClassificationTaskConfig,
    GymTaskConfig,
    LanguageModelTaskConfig,
    TaskConfig,
)
from strategies.eggroll.tasks.gym import GymTask, episode_seed
from strategies.eggroll.tasks.supervised import SupervisedTask

SEED = 3
TINY_LM = {"corpus_chars": 4000, "embed": 8, "hidden": 16, "seq_len": 12, "batch_size": 4}
TINY_TRANSFORMER = {"kind": "transformer", "d_model": 16, "layers": 1, "heads": 2}


@pytest.fixture(scope="module")
def digits(dataset_root: Path) -> DatasetInfo:
    return resolve_dataset(DataConfig(dataset="digits", batch_size=64, root=str(dataset_root)))


@pytest.fixture(scope="module")
def grammar(dataset_root: Path) -> DatasetInfo:
    data = DataConfig(dataset="grammar", text={"context": 16}, root=str(dataset_root))
    return resolve_dataset(data)


def transformer_lm(grammar: DatasetInfo, **task: object) -> SupervisedTask:
    config = LanguageModelTaskConfig(batch_size=4, **task)
    return SupervisedTask(config, ModelConfig(**TINY_TRANSFORMER), grammar)


def cartpole(**overrides: object) -> GymTask:
    return GymTask(GymTaskConfig(max_episode_steps=50, **overrides))


@pytest.fixture
def make_task(request: pytest.FixtureRequest):
    """The task of a kind; the data sets are generated only for the kinds that read them."""

    def make(kind: str) -> ESTask:
        if kind == "gym":
            return cartpole(episodes_per_member=2)
        if kind == "classification":
            config = ClassificationTaskConfig(batch_size=64)
            return SupervisedTask(
                config, ModelConfig(hidden=[32]), request.getfixturevalue("digits")
            )
        if kind == "lm":
            return transformer_lm(request.getfixturevalue("grammar"))
        return CharLMTask(CharLMTaskConfig(**TINY_LM))

    return make


KINDS = ["gym", "classification", "lm", "char_lm"]


def fitness_of(
    task: ESTask,
    model: torch.nn.Module,
    members: list[int],
    generation: int = 0,
    sigma: float = 0.5,
    calling_generation: int | None = None,
) -> torch.Tensor:
    """Fitness of ``members`` perturbed as in ``generation``, scored in ``calling_generation``
    (default the same), all in one call."""
    noise = member_noise(es_parameters(model), members, SEED, generation, sigma, NoiseSpec(rank=1))
    scored_in = generation if calling_generation is None else calling_generation
    with population(model, noise):
        return task.fitness(model, len(members), scored_in, SEED)


@pytest.mark.parametrize("kind", KINDS)
def test_a_members_fitness_does_not_depend_on_its_shard(kind: str, make_task):
    task = make_task(kind)
    model = task.build_model(SEED)
    whole = fitness_of(task, model, list(range(6)))
    split = torch.cat([fitness_of(task, model, [0, 1, 2]), fitness_of(task, model, [3, 4, 5])])
    assert whole.shape == (6,) and whole.dtype == torch.float32
    assert len(set(whole.tolist())) > 1  # the perturbations matter, so the test has teeth
    torch.testing.assert_close(whole, split)


@pytest.mark.parametrize("kind", KINDS)
def test_a_generation_is_repeatable_and_the_next_one_differs(kind: str, make_task):
    task = make_task(kind)
    model = task.build_model(SEED)
    first = fitness_of(task, model, list(range(4)))
    torch.testing.assert_close(fitness_of(task, model, list(range(4))), first)
    next_data = fitness_of(task, model, list(range(4)), calling_generation=1)
    assert not torch.equal(next_data, first)


def plain_returns(model: torch.nn.Module, seeds: list[int], steps: int) -> list[float]:
    """The unperturbed argmax policy on CartPole, one plain env per episode."""
    returns = []
    for seed in seeds:
        env = gym.make("CartPole-v1", max_episode_steps=steps)
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = int(model(torch.as_tensor(obs)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return returns


def balancing_policy(task: GymTask) -> torch.nn.Module:
    """A linear policy that pushes toward the pole's lean: it outlives a 20-step cap."""
    model = task.build_model(SEED)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
        model[0].bias.zero_()
    return model


@pytest.mark.parametrize("policy", ["untrained", "balancing"])
def test_a_zero_noise_member_scores_what_the_plain_policy_does(policy: str):
    steps = 20 if policy == "balancing" else 50
    task = GymTask(GymTaskConfig(hidden=[], max_episode_steps=steps, episodes_per_member=3))
    model = balancing_policy(task) if policy == "balancing" else task.build_model(SEED)
    expected = plain_returns(model, [episode_seed(SEED, 4, e) for e in range(3)], steps)
    fitness = fitness_of(task, model, [0, 1], generation=4, sigma=0.0)
    assert fitness.tolist() == pytest.approx([sum(expected) / 3] * 2)
    if policy == "balancing":
        assert expected == [20.0] * 3  # truncated, not terminated, episodes are counted once


def test_evaluation_episodes_are_disjoint_from_training_episodes():
    train = {episode_seed(SEED, g, e) for g in range(20) for e in range(5)}
    held_out = {episode_seed(SEED, None, e) for e in range(20)}
    assert len(train) == 100 and len(held_out) == 20
    assert min(held_out) > max(train)  # disjoint ranges, not merely unlikely to collide
    task = cartpole(hidden=[], eval_episodes=5)
    result = task.evaluate(balancing_policy(task), SEED)
    assert result == {"eval/return": 50.0, "eval/return_min": 50.0}


def test_box_actions_run_pendulum_and_score_negative_returns():
    task = GymTask(GymTaskConfig(env="Pendulum-v1", max_episode_steps=20, eval_episodes=2))
    model = task.build_model(SEED)
    fitness = fitness_of(task, model, [0, 1, 2, 3])
    assert fitness.shape == (4,) and (fitness < 0).all()
    assert task.evaluate(model, SEED)["eval/return"] < 0


@pytest.mark.parametrize("env", ["NoSuchEnv-v0", "FrozenLake-v1"])
def test_unknown_or_unsupported_envs_are_config_errors(env: str):
    with pytest.raises(ConfigError, match=r"strategy\.task\.env.*allowed"):
        GymTask(GymTaskConfig(env=env))


def test_models_are_built_from_the_seed_alone():
    task = cartpole()
    same = zip(es_parameters(task.build_model(1)), es_parameters(task.build_model(1)))
    assert all(torch.equal(a, b) for a, b in same)
    other = zip(es_parameters(task.build_model(1)), es_parameters(task.build_model(2)))
    assert not all(torch.equal(a, b) for a, b in other)


def test_classification_evaluates_held_out_accuracy_and_loss(digits: DatasetInfo):
    task = SupervisedTask(
        ClassificationTaskConfig(batch_size=64, eval_batches=1), ModelConfig(hidden=[32]), digits
    )
    result = task.evaluate(task.build_model(SEED), SEED)
    assert set(result) == {"eval/accuracy", "eval/loss"}
    assert 0.0 <= result["eval/accuracy"] <= 0.5  # untrained: near chance on 10 classes
    assert result["eval/loss"] == pytest.approx(math.log(10), rel=0.5)


def test_classification_without_data_is_a_config_error():
    with pytest.raises(ConfigError, match="data section"):
        build_task(ClassificationTaskConfig(), ModelConfig(), None)


def test_task_configs_are_picked_by_kind(digits: DatasetInfo, grammar: DatasetInfo):
    adapter = TypeAdapter(TaskConfig)
    lm = adapter.validate_python({"kind": "char_lm", **TINY_LM})
    assert isinstance(build_task(lm, None, None), CharLMTask)
    assert isinstance(build_task(adapter.validate_python({"kind": "gym"}), None, None), GymTask)
    classify = adapter.validate_python({"kind": "classification"})
    assert isinstance(build_task(classify, None, digits), SupervisedTask)
    lm = adapter.validate_python({"kind": "lm"})
    assert isinstance(build_task(lm, ModelConfig(**TINY_TRANSFORMER), grammar), SupervisedTask)


def test_the_generated_corpus_is_fixed_and_rich():
    text = generated_corpus(5000)
    assert text == generated_corpus(5000) and len(text) == 5000
    assert len(set(text)) > 20


def test_an_untrained_language_model_knows_nothing():
    task = CharLMTask(CharLMTaskConfig(**TINY_LM))
    result = task.evaluate(task.build_model(SEED), SEED)
    uniform = math.log2(len(task.corpus.vocab))
    assert result["eval/bits_per_char"] == pytest.approx(uniform, rel=0.1)
    assert result["eval/loss"] == pytest.approx(result["eval/bits_per_char"] * math.log(2))


def test_int8_gates_run_and_round_the_weights():
    plain = CharLMTask(CharLMTaskConfig(**TINY_LM))
    int8 = CharLMTask(CharLMTaskConfig(**TINY_LM, int8=True))
    fitness = fitness_of(int8, int8.build_model(SEED), [0, 1, 2, 3])
    assert torch.isfinite(fitness).all()
    assert not torch.equal(fitness, fitness_of(plain, plain.build_model(SEED), [0, 1, 2, 3]))


def test_a_corpus_file_sets_the_vocabulary(tmp_path: Path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcab cabba\n" * 100, encoding="utf-8")
    task = CharLMTask(CharLMTaskConfig(**{**TINY_LM, "corpus": str(path)}))
    assert task.corpus.vocab == "\n abc"
    with pytest.raises(ConfigError, match=r"strategy\.task\.corpus"):
        CharLMTask(CharLMTaskConfig(corpus=str(tmp_path / "missing.txt")))


def test_a_language_model_task_reports_bits_per_token_near_uniform_untrained(grammar: DatasetInfo):
    task = transformer_lm(grammar, eval_batches=2)
    result = task.evaluate(task.build_model(SEED), SEED)
    assert set(result) == {"eval/accuracy", "eval/loss", "eval/bits_per_token"}
    assert result["eval/bits_per_token"] == pytest.approx(8.0, rel=0.05)  # 256 byte values
    assert result["eval/loss"] == pytest.approx(result["eval/bits_per_token"] * math.log(2))


def test_a_zero_noise_member_scores_the_plain_networks_batch_loss(grammar: DatasetInfo):
    task = transformer_lm(grammar)
    model = task.build_model(SEED)
    x, y = BatchStream(grammar, "train", 4, SEED).batch(2)  # the batch of generation 2
    plain = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    fitness = fitness_of(task, model, [0, 1, 2], generation=2, sigma=0.0)
    torch.testing.assert_close(fitness, -plain.expand(3), rtol=1e-5, atol=1e-5)


def test_a_task_that_does_not_fit_the_data_is_a_config_error(
    grammar: DatasetInfo, digits: DatasetInfo
):
    with pytest.raises(ConfigError, match="set strategy.task.kind: lm"):
        SupervisedTask(ClassificationTaskConfig(), ModelConfig(**TINY_TRANSFORMER), grammar)
    with pytest.raises(ConfigError, match="lm predicts next tokens"):
        SupervisedTask(LanguageModelTaskConfig(), ModelConfig(hidden=[8]), digits)
