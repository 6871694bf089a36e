"""Search spaces: sampling, perturbation and explore stay inside what the user declared."""

from __future__ import annotations

import math
import random

import pytest
from pydantic import ValidationError

from strategies.pbt.search_space import Distribution, explore, sample_space

SPACES = {
    "u": Distribution(uniform=(-1.0, 2.0)),
    "log": Distribution(loguniform=(1e-4, 1e-1)),
    "int": Distribution(randint=(1, 6)),
    "pick": Distribution(choice=("linear", "augmented", "deep")),
}


@pytest.mark.parametrize("name", sorted(SPACES))
def test_samples_and_mutations_never_leave_the_range(name):
    dist = SPACES[name]
    rng = random.Random(0)
    value = dist.sample(rng)
    for _ in range(2000):
        assert dist.contains(value), (name, value)
        value = dist.perturb(value, rng, [0.5, 3.0]) if rng.random() < 0.7 else dist.sample(rng)
    assert dist.contains(value)


def test_loguniform_samples_are_spread_over_decades():
    rng = random.Random(1)
    values = [SPACES["log"].sample(rng) for _ in range(3000)]
    decades = [sum(10**-k <= v < 10 ** (-k + 1) for v in values) for k in (4, 3, 2)]
    assert all(900 < d < 1100 for d in decades), decades


def test_perturb_scales_by_a_factor_and_clips():
    dist = Distribution(uniform=(0.0, 1.0))
    rng = random.Random(0)
    seen = {round(dist.perturb(0.5, rng, [0.8, 1.2]), 9) for _ in range(50)}
    assert seen == {0.4, 0.6}
    assert dist.perturb(0.95, random.Random(3), [2.0]) == 1.0


def test_a_choice_moves_to_a_neighbour():
    dist = SPACES["pick"]
    rng = random.Random(0)
    assert {dist.perturb("augmented", rng, [0.8]) for _ in range(50)} == {"linear", "deep"}
    assert {dist.perturb("linear", rng, [0.8]) for _ in range(50)} == {"linear", "augmented"}


def test_randint_rounds_to_integers():
    dist = SPACES["int"]
    rng = random.Random(0)
    values = {dist.perturb(4, rng, [0.8, 1.2]) for _ in range(50)}
    assert values == {3, 5} and all(isinstance(v, int) for v in values)


def test_small_integers_still_move():
    dist = Distribution(randint=(1, 8))
    rng = random.Random(0)
    assert {dist.perturb(2, rng, [0.8, 1.2]) for _ in range(50)} == {1, 3}
    assert {dist.perturb(1, rng, [0.8, 1.2]) for _ in range(50)} == {1, 2}


def test_explore_with_a_fixed_seed_is_reproducible_and_resamples_at_the_given_rate():
    values = sample_space(SPACES, random.Random(7))
    a = explore(values, SPACES, random.Random(11), 0.25, [0.8, 1.2])
    b = explore(values, SPACES, random.Random(11), 0.25, [0.8, 1.2])
    assert a == b
    rng = random.Random(5)
    space = {"x": Distribution(uniform=(0.0, 100.0))}
    outcomes = [explore({"x": 50.0}, space, rng, 0.3, [0.8, 1.2])["x"] for _ in range(4000)]
    perturbed = sum(math.isclose(v, 40.0) or math.isclose(v, 60.0) for v in outcomes)
    assert 0.66 < perturbed / len(outcomes) < 0.74


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "exactly one of"),
        ({"uniform": [0, 1], "choice": [1, 2]}, "exactly one of"),
        ({"uniform": [1, 1]}, "lo < hi"),
        ({"loguniform": [0, 1]}, "lo > 0"),
        ({"choice": ["only"]}, "at least two"),
    ],
)
def test_bad_spaces_are_rejected_with_the_fix(spec, message):
    with pytest.raises(ValidationError, match=message):
        Distribution.model_validate(spec)
