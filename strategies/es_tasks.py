"""The fitness functions EGGROLL optimises: a gym policy, a classifier, a character-level LM.

Pure torch and gymnasium, no Ray. Every task keeps one rule that sharding a population
across workers depends on: member j's fitness is a function of (generation, seed, j's
perturbation) alone, never of which other members share the call. So all members of a
generation meet the same environment seeds or the same batch (common random numbers):
workers scoring different shards use one yardstick, and fitness differences between
members measure their perturbations rather than their luck.

Inside ``population(model, noise)`` the models take inputs with a leading member dim k;
a shared input is ``expand``-ed to it (no copy), and one model call serves all k members.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Protocol

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from gymnasium.vector import SyncVectorEnv, VectorEnv
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from orchestrator.data.source import DatasetInfo
from orchestrator.data.stream import BatchStream
from orchestrator.errors import ConfigError
from strategies.eggroll import ESEmbedding, ESInt8Linear, ESLinear
from strategies.network import ModelConfig, layer_widths


class ESTask(Protocol):
    """What a population worker needs from a task."""

    def build_model(self, seed: int) -> nn.Module:
        """ES layers only, initialised from ``seed`` alone (every replica builds the same)."""
        ...

    def fitness(self, model: nn.Module, k: int, generation: int, seed: int) -> torch.Tensor:
        """Inside ``population``: float32 [k], higher is better, one per member."""
        ...

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        """The unperturbed model on held-out episodes or data; keys start with ``eval/``."""
        ...


# -- configs ------------------------------------------------------------------------------


class GymTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["gym"] = "gym"
    env: str = Field(default="CartPole-v1", description="A gymnasium environment id.")
    hidden: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [16], description="Hidden widths of the tanh MLP policy."
    )
    episodes_per_member: int = Field(default=1, gt=0, description="Fitness = their mean return.")
    max_episode_steps: int | None = Field(
        default=None, gt=0, description="Episode length cap; None keeps the env's own."
    )
    eval_episodes: int = Field(default=20, gt=0)


class ClassificationTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["classification"] = "classification"
    batch_size: int = Field(default=256, gt=0, description="Train rows every member is scored on.")
    eval_batches: int | None = Field(
        default=None, gt=0, description="Cap on held-out batches; None evaluates all."
    )


class CharLMTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["char_lm"] = "char_lm"
    corpus: str | None = Field(
        default=None, description="A UTF-8 text file; None generates a corpus from a grammar."
    )
    corpus_chars: int = Field(
        default=200_000, gt=0, description="Characters used (generated, or the file's first)."
    )
    embed: int = Field(default=32, gt=0)
    hidden: int = Field(default=128, gt=0, description="GRU state width.")
    seq_len: int = Field(default=64, gt=0, description="Characters predicted per sequence.")
    batch_size: int = Field(default=16, gt=0, description="Sequences every member is scored on.")
    int8: bool = Field(default=False, description="Run the GRU gates on int8 weights.")
    eval_sequences: int = Field(default=64, gt=0)


TaskConfig = Annotated[
    GymTaskConfig | ClassificationTaskConfig | CharLMTaskConfig, Field(discriminator="kind")
]


def build_task(
    config: TaskConfig, model: ModelConfig | None, dataset: DatasetInfo | None
) -> ESTask:
    """The task a config describes; classification uses the run's model and data sections."""
    if isinstance(config, GymTaskConfig):
        return GymTask(config)
    if isinstance(config, CharLMTaskConfig):
        return CharLMTask(config)
    if dataset is None:
        raise ConfigError(
            "strategy.task.kind: classification needs a data section (data.dataset or "
            "data.path); add one, or choose kind gym or char_lm"
        )
    return ClassificationTask(config, model or ModelConfig(), dataset)


# -- shared helpers -----------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Layers created inside draw their init from ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _member_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per member: logits [k, ..., C], targets [...] shared by all -> [k]."""
    log_probs = logits.log_softmax(-1)
    index = targets.expand(log_probs.shape[:-1]).unsqueeze(-1)
    return -log_probs.gather(-1, index).squeeze(-1).flatten(1).mean(1)


# -- gym ----------------------------------------------------------------------------------

_ALLOWED_ENVS = (
    "allowed: an installed gymnasium environment with a Box observation space and a Discrete "
    "or bounded Box action space, e.g. CartPole-v1, Acrobot-v1, MountainCar-v0, Pendulum-v1"
)
_TRAIN_SALT, _EVAL_SALT = 0x7EA1, 0xE7A1


def episode_seed(seed: int, generation: int | None, episode: int) -> int:
    """The env seed of one episode: a hash of its key, so it is the same in every shard.

    Training seeds lie in [0, 2^31) and evaluation seeds (``generation=None``) in
    [2^31, 2^32): the policy is never evaluated on an episode it was trained on.
    """
    if generation is None:
        key = [_EVAL_SALT, seed, episode]
    else:
        key = [_TRAIN_SALT, seed, generation, episode]
    value = int(np.random.SeedSequence(key).generate_state(1)[0]) >> 1
    return value if generation is not None else value | (1 << 31)


class _DiscreteHead:
    """Logits -> the argmax action: a deterministic policy, so fitness has no action noise."""

    def __init__(self, space: spaces.Discrete) -> None:
        self.size = int(space.n)
        self.start = int(space.start)

    def actions(self, out: torch.Tensor) -> np.ndarray:
        return (out.argmax(-1) + self.start).cpu().numpy()


class _BoxHead:
    """Outputs squashed by tanh onto the action bounds."""

    def __init__(self, space: spaces.Box) -> None:
        self.size = int(np.prod(space.shape))
        self.shape = space.shape
        self.dtype = space.dtype
        self.low = torch.as_tensor(space.low.reshape(-1), dtype=torch.float32)
        self.span = torch.as_tensor((space.high - space.low).reshape(-1), dtype=torch.float32)

    def actions(self, out: torch.Tensor) -> np.ndarray:
        unit = (torch.tanh(out.cpu()) + 1) / 2
        return (self.low + unit * self.span).numpy().reshape(-1, *self.shape).astype(self.dtype)


def _action_head(env: str, space: spaces.Space) -> _DiscreteHead | _BoxHead:
    if isinstance(space, spaces.Discrete):
        return _DiscreteHead(space)
    bounded = isinstance(space, spaces.Box) and np.isfinite([space.low, space.high]).all()
    if bounded:
        return _BoxHead(space)
    raise ConfigError(f"strategy.task.env: {env!r} has the action space {space}; {_ALLOWED_ENVS}")


def _returns(
    envs: VectorEnv, seeds: list[int], policy: Callable[[torch.Tensor], np.ndarray]
) -> np.ndarray:
    """Undiscounted return of each sub-environment's first episode from its seed.

    Gymnasium 1.x resets a finished sub-environment on its next step (NEXT_STEP autoreset),
    so a reward counts only while its episode is alive, and the step that ends an episode
    is counted before its flag clears.
    """
    obs, _ = envs.reset(seed=seeds)
    alive = np.ones(envs.num_envs, dtype=bool)
    total = np.zeros(envs.num_envs)
    while alive.any():
        obs, reward, terminated, truncated, _ = envs.step(policy(torch.from_numpy(obs)))
        total += reward * alive
        alive &= ~(terminated | truncated)
    return total


class GymTask:
    """A tanh MLP policy on any gymnasium env with Box observations.

    Fitness steps all k * episodes_per_member episodes in one vector env, with one policy
    call per env step for the whole population.
    """

    def __init__(self, config: GymTaskConfig) -> None:
        self.config = config
        probe = self._make_env()
        try:
            obs_space, act_space = probe.observation_space, probe.action_space
            has_limit = probe.spec is not None and probe.spec.max_episode_steps is not None
        finally:
            probe.close()
        if not isinstance(obs_space, spaces.Box):
            raise ConfigError(
                f"strategy.task.env: {config.env!r} has the observation space {obs_space}; "
                f"{_ALLOWED_ENVS}"
            )
        if not has_limit:
            raise ConfigError(
                f"strategy.task.max_episode_steps: {config.env!r} has no time limit of its "
                "own; set one so that every episode ends"
            )
        self.obs_dim = int(np.prod(obs_space.shape))
        self.head = _action_head(config.env, act_space)
        self._envs: dict[str, VectorEnv] = {}

    def _make_env(self) -> gym.Env:
        try:
            return gym.make(self.config.env, max_episode_steps=self.config.max_episode_steps)
        except gym.error.Error as err:
            raise ConfigError(
                f"strategy.task.env: {self.config.env!r} cannot be made ({err}); {_ALLOWED_ENVS}"
            ) from None

    def _vector_env(self, purpose: str, count: int) -> VectorEnv:
        """A cached vector env of ``count`` sub-envs: making envs costs more than stepping."""
        cached = self._envs.get(purpose)
        if cached is not None and cached.num_envs == count:
            return cached
        if cached is not None:
            cached.close()
        envs = SyncVectorEnv([self._make_env] * count, copy=False)
        self._envs[purpose] = envs
        return envs

    def build_model(self, seed: int) -> nn.Module:
        widths = [self.obs_dim, *self.config.hidden]
        layers: list[nn.Module] = []
        with _seeded(seed):
            for fan_in, fan_out in itertools.pairwise(widths):
                layers += [ESLinear(fan_in, fan_out), nn.Tanh()]
            layers.append(ESLinear(widths[-1], self.head.size))
        return nn.Sequential(*layers)

    @torch.no_grad()
    def fitness(self, model: nn.Module, k: int, generation: int, seed: int) -> torch.Tensor:
        """Mean return of each member; episode e of every member starts from one env seed."""
        episodes = self.config.episodes_per_member
        seeds = [episode_seed(seed, generation, e) for e in range(episodes)] * k
        device = _device(model)

        def policy(obs: torch.Tensor) -> np.ndarray:
            out = model(obs.reshape(k, episodes, -1).to(device, torch.float32))
            return self.head.actions(out.reshape(k * episodes, -1))

        total = _returns(self._vector_env("train", k * episodes), seeds, policy)
        return torch.from_numpy(total).view(k, episodes).mean(1).float()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        count = self.config.eval_episodes
        seeds = [episode_seed(seed, None, e) for e in range(count)]
        device = _device(model)

        def policy(obs: torch.Tensor) -> np.ndarray:
            return self.head.actions(model(obs.reshape(count, -1).to(device, torch.float32)))

        total = _returns(self._vector_env("eval", count), seeds, policy)
        return {"eval/return": float(total.mean()), "eval/return_min": float(total.min())}


# -- classification -----------------------------------------------------------------------

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class ClassificationTask:
    """The run's MLP on the run's data; fitness is minus the loss on generation t's batch."""

    def __init__(
        self, config: ClassificationTaskConfig, model: ModelConfig, dataset: DatasetInfo
    ) -> None:
        if model.norm == "batchnorm":
            raise ConfigError(
                "model.norm: 'batchnorm' is not allowed with eggroll, whose members share a "
                "batch; use 'layernorm' or 'none'"
            )
        if model.dropout > 0:
            raise ConfigError(
                f"model.dropout: {model.dropout} is not allowed with eggroll, which scores "
                "deterministic members; set it to 0"
            )
        self.config = config
        self.model_config = model
        self.dataset = dataset
        self._stream: BatchStream | None = None
        self._stream_seed: int | None = None

    def build_model(self, seed: int) -> nn.Module:
        """ESLinear layers; layernorm without a gain or bias, as plain LayerNorm params
        would take noise that its forward never applies."""
        widths = layer_widths(self.model_config, self.dataset.num_features)
        layers: list[nn.Module] = []
        with _seeded(seed):
            for fan_in, fan_out in itertools.pairwise(widths):
                layers.append(ESLinear(fan_in, fan_out))
                if self.model_config.norm == "layernorm":
                    layers.append(nn.LayerNorm(fan_out, elementwise_affine=False))
                layers.append(_ACTIVATIONS[self.model_config.activation]())
            layers.append(ESLinear(widths[-1], self.dataset.num_classes))
        return nn.Sequential(*layers)

    def _train_batch(self, generation: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train batch ``generation``; the stream is kept, as sequential batches are cheap."""
        if self._stream is None or self._stream_seed != seed:
            self._stream = BatchStream(self.dataset, "train", self.config.batch_size, seed)
            self._stream_seed = seed
        return self._stream.batch(generation)

    @torch.no_grad()
    def fitness(self, model: nn.Module, k: int, generation: int, seed: int) -> torch.Tensor:
        x, y = self._train_batch(generation, seed)
        device = _device(model)
        logits = model(x.to(device).expand(k, *x.shape))
        return -_member_nll(logits, y.to(device)).float().cpu()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        stream = BatchStream(self.dataset, "test", self.config.batch_size, seed)
        device = _device(model)
        loss, correct, rows = 0.0, 0, 0
        for x, y in itertools.islice(stream, self.config.eval_batches):
            logits = model(x.to(device))
            target = y.to(device)
            loss += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(-1) == target).sum())
            rows += len(y)
        return {"eval/accuracy": correct / max(rows, 1), "eval/loss": loss / max(rows, 1)}


# -- character-level language model -------------------------------------------------------

_CORPUS_SEED = 20250101
_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas"]
_AGENTS = {
    "cat": "cats",
    "dog": "dogs",
    "fox": "foxes",
    "child": "children",
    "farmer": "farmers",
    "teacher": "teachers",
    "bird": "birds",
    "mouse": "mice",
    "robot": "robots",
    "sailor": "sailors",
}
_THINGS = {
    "apple": "apples",
    "box": "boxes",
    "letter": "letters",
    "lamp": "lamps",
    "boat": "boats",
    "key": "keys",
    "song": "songs",
    "stone": "stones",
    "umbrella": "umbrellas",
    "book": "books",
}
_TRANSITIVE = [
    ("see", "sees", "saw"),
    ("find", "finds", "found"),
    ("carry", "carries", "carried"),
    ("paint", "paints", "painted"),
    ("build", "builds", "built"),
    ("want", "wants", "wanted"),
    ("hide", "hides", "hid"),
    ("sell", "sells", "sold"),
]
_INTRANSITIVE = [
    ("sleep", "sleeps", "slept"),
    ("sing", "sings", "sang"),
    ("run", "runs", "ran"),
    ("wait", "waits", "waited"),
    ("laugh", "laughs", "laughed"),
    ("swim", "swims", "swam"),
]
_ADJECTIVES = ["small", "big", "red", "old", "quiet", "happy", "green", "strange", "empty"]
_PLACES = ["garden", "river", "bridge", "market", "house", "forest", "harbour", "station"]
_PREPOSITIONS = ["in", "near", "under", "behind", "at", "beside"]
_WEEKDAYS = ["Monday", "Tuesday", "Friday", "Sunday"]


class _Grammar:
    """A small stochastic English grammar with agreement, articles, numbers and quotes:
    structure a character model can learn at several scales, with no download."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, options: list[str]) -> str:
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def noun_phrase(self, nouns: dict[str, str], plural: bool) -> str:
        words = [self.pick(_ADJECTIVES)] if self.chance(0.4) else []
        noun = self.pick(list(nouns))
        words.append(nouns[noun] if plural else noun)
        if plural:
            det = self.pick(["the", "some", "many", str(self.rng.randint(2, 99))])
        else:
            det = self.pick(["the", "a", "this", "every"])
            if det == "a" and words[0][0] in "aeiou":
                det = "an"
        return " ".join([det, *words])

    def subject(self) -> tuple[str, bool]:
        """The subject and whether it is plural (the verb agrees with it)."""
        if self.chance(0.3):
            return self.pick(_NAMES), False
        plural = self.chance(0.4)
        return self.noun_phrase(_AGENTS, plural), plural

    def predicate(self, form: int) -> str:
        """Verb form 0 base, 1 third person singular, 2 past; an object if transitive."""
        if self.chance(0.6):
            verb = self.rng.choice(_TRANSITIVE)[form]
            words = [verb, self.noun_phrase(_THINGS, self.chance(0.4))]
        else:
            words = [self.rng.choice(_INTRANSITIVE)[form]]
        if self.chance(0.4):
            words.append(f"{self.pick(_PREPOSITIONS)} the {self.pick(_PLACES)}")
        if self.chance(0.2):
            words.append(f"on {self.pick(_WEEKDAYS)}")
        elif self.chance(0.1):
            words.append(f"in {self.rng.randint(1800, 2030)}")
        return " ".join(words)

    def clause(self) -> str:
        subject, plural = self.subject()
        form = 2 if self.chance(0.5) else 0 if plural else 1
        return f"{subject} {self.predicate(form)}"

    def question(self) -> str:
        subject, plural = self.subject()
        aux = "did" if self.chance(0.5) else "do" if plural else "does"
        return f"{aux} {subject} {self.predicate(0)}?"

    def sentence(self) -> str:
        roll = self.rng.random()
        if roll < 0.15:
            text = self.question()
        elif roll < 0.3:
            text = f'{self.pick(_NAMES)} said, "{_capitalised(self.clause())}."'
        elif roll < 0.45:
            text = f"{self.clause()}, {self.pick(['and', 'but', 'so'])} {self.clause()}."
        else:
            text = self.clause() + ("!" if self.chance(0.1) else ".")
        return _capitalised(text)


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def generated_corpus(chars: int) -> str:
    """``chars`` characters of grammar sentences, paragraphs on lines; always the same text."""
    grammar = _Grammar(_CORPUS_SEED)
    paragraphs: list[str] = []
    length = 0
    while length < chars:
        sentences = [grammar.sentence() for _ in range(grammar.rng.randint(2, 6))]
        paragraphs.append(" ".join(sentences))
        length += len(paragraphs[-1]) + 1
    return "\n".join(paragraphs)[:chars]


@dataclass(frozen=True)
class CharCorpus:
    """A text as character ids, split 90/10 by position into train and held-out."""

    vocab: str
    train: torch.Tensor
    held_out: torch.Tensor

    @classmethod
    def from_text(cls, text: str) -> CharCorpus:
        vocab = "".join(sorted(set(text)))
        lookup = {char: index for index, char in enumerate(vocab)}
        ids = torch.tensor([lookup[char] for char in text], dtype=torch.long)
        cut = int(len(ids) * 0.9)
        return cls(vocab, ids[:cut], ids[cut:])


def _read_corpus(path: str, chars: int) -> str:
    try:
        with open(Path(path).expanduser(), encoding="utf-8") as handle:
            return handle.read(chars)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"strategy.task.corpus: {path!r} is not a readable UTF-8 text file ({err}); give "
            "one, or remove strategy.task.corpus to use the generated corpus"
        ) from None


class CharGRU(nn.Module):
    """Embedding, a GRU cell whose gates are ES layers, and a linear head over characters.

    Tokens [..., T] -> next-character logits [..., T, vocab]. The input gates of all T
    steps are one call; only the hidden-state gates run step by step.
    """

    def __init__(self, vocab: int, embed: int, hidden: int, int8: bool) -> None:
        super().__init__()
        gate = ESInt8Linear if int8 else ESLinear
        self.hidden = hidden
        self.embed = ESEmbedding(vocab, embed)
        self.input_gates = gate(embed, 3 * hidden)
        self.hidden_gates = gate(hidden, 3 * hidden)
        self.head = ESLinear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from_input = self.input_gates(self.embed(tokens))
        state = from_input.new_zeros(*tokens.shape[:-1], self.hidden)
        states = []
        for step in range(tokens.shape[-1]):
            state = self._step(from_input[..., step, :], state)
            states.append(state)
        return self.head(torch.stack(states, dim=-2))

    def _step(self, from_input: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One GRU step; both sigmoid gates in one call, as elementwise launches dominate."""
        split = [2 * self.hidden, self.hidden]
        x_gates, x_new = from_input.split(split, dim=-1)
        h_gates, h_new = self.hidden_gates(state).split(split, dim=-1)
        reset, update = torch.sigmoid(x_gates + h_gates).chunk(2, dim=-1)
        candidate = torch.tanh(x_new + reset * h_new)
        return candidate + update * (state - candidate)


_LM_SALT = 0xC4A2


def _windows(ids: torch.Tensor, starts: np.ndarray, length: int) -> torch.Tensor:
    """Sequences [len(starts), length] cut from ``ids`` at ``starts``."""
    return ids[torch.from_numpy(starts).view(-1, 1) + torch.arange(length)]


class CharLMTask:
    """Next-character prediction; fitness is minus the mean cross-entropy in nats/char."""

    def __init__(self, config: CharLMTaskConfig) -> None:
        self.config = config
        if config.corpus is None:
            text = generated_corpus(config.corpus_chars)
        else:
            text = _read_corpus(config.corpus, config.corpus_chars)
        self.corpus = CharCorpus.from_text(text)
        if len(self.corpus.held_out) <= config.seq_len:
            raise ConfigError(
                f"strategy.task.corpus_chars: {len(text)} characters leave a held-out tenth "
                f"too short for one sequence of strategy.task.seq_len {config.seq_len}; use "
                f"at least {10 * (config.seq_len + 2)} characters or a shorter seq_len"
            )

    def build_model(self, seed: int) -> nn.Module:
        with _seeded(seed):
            return CharGRU(
                len(self.corpus.vocab), self.config.embed, self.config.hidden, self.config.int8
            )

    def _pairs(self, sequences: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, ...]:
        """Inputs and targets on the model's device: each character predicts the next."""
        device = _device(model)
        return sequences[:, :-1].to(device), sequences[:, 1:].to(device)

    @torch.no_grad()
    def fitness(self, model: nn.Module, k: int, generation: int, seed: int) -> torch.Tensor:
        length = self.config.seq_len + 1
        rng = np.random.default_rng([_LM_SALT, seed, generation])
        starts = rng.integers(0, len(self.corpus.train) - length + 1, size=self.config.batch_size)
        inputs, targets = self._pairs(_windows(self.corpus.train, starts, length), model)
        logits = model(inputs.expand(k, *inputs.shape))
        return -_member_nll(logits, targets).float().cpu()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        """The same evenly spaced held-out sequences every time, whatever the seed."""
        length = self.config.seq_len + 1
        last = len(self.corpus.held_out) - length
        starts = np.linspace(0, last, self.config.eval_sequences).round().astype(np.int64)
        inputs, targets = self._pairs(_windows(self.corpus.held_out, starts, length), model)
        loss = _member_nll(model(inputs).unsqueeze(0), targets).item()
        return {"eval/bits_per_char": loss / math.log(2), "eval/loss": loss}
