"""Gymnasium tasks: a policy sized from the spaces, all members in one vector env."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import SyncVectorEnv, VectorEnv
from torch import nn

from orchestrator.errors import ConfigError
from strategies.eggroll.lowrank import ESLinear
from strategies.eggroll.tasks.common import model_device
from strategies.eggroll.tasks.configs import GymTaskConfig
from strategies.models.network import seeded

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
        with seeded(seed):
            for fan_in, fan_out in itertools.pairwise(widths):
                layers += [ESLinear(fan_in, fan_out), nn.Tanh()]
            layers.append(ESLinear(widths[-1], self.head.size))
        return nn.Sequential(*layers)

    @torch.no_grad()
    def fitness(self, model: nn.Module, k: int, generation: int, seed: int) -> torch.Tensor:
        """Mean return of each member; episode e of every member starts from one env seed."""
        episodes = self.config.episodes_per_member
        seeds = [episode_seed(seed, generation, e) for e in range(episodes)] * k
        device = model_device(model)

        def policy(obs: torch.Tensor) -> np.ndarray:
            out = model(obs.reshape(k, episodes, -1).to(device, torch.float32))
            return self.head.actions(out.reshape(k * episodes, -1))

        total = _returns(self._vector_env("train", k * episodes), seeds, policy)
        return torch.from_numpy(total).view(k, episodes).mean(1).float()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        count = self.config.eval_episodes
        seeds = [episode_seed(seed, None, e) for e in range(count)]
        device = model_device(model)

        def policy(obs: torch.Tensor) -> np.ndarray:
            return self.head.actions(model(obs.reshape(count, -1).to(device, torch.float32)))

        total = _returns(self._vector_env("eval", count), seeds, policy)
        return {"eval/return": float(total.mean()), "eval/return_min": float(total.min())}
