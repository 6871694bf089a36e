"""Which examples are held out when a data set comes without a test split of its own."""

from __future__ import annotations

import numpy as np

_SPLIT_SALT = 0x5EED_DA7A_0F_7E57


def held_out(positions: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each example, by its position in the unshuffled data, belongs to the test split.

    A fixed hash (splitmix64) of the position rather than a random draw, so any process can
    decide an example's side from its position alone, and train and test streams always agree.
    """
    z = positions.astype(np.uint64) + np.uint64(_SPLIT_SALT)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction
