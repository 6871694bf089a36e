"""Images for classification: reading an image column, the standard augmentation and
per-channel normalisation, as plain numpy functions (Pillow for encoded bytes, no torch).

Pixels stay in their stored type (uint8 for bytes and encoded files) until a batch is cut,
so a shuffle window of CIFAR-sized images holds a quarter of what float32 would.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from orchestrator.errors import ConfigError

Shape = tuple[int, int, int]
Storage = Literal["uint8", "float", "encoded"]
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # Pillow's mode for an encoded image of C channels
_AUGMENT_SALT = 3  # apart from the stream's order and split salts


@dataclass(frozen=True)
class ImageFormat:
    """How a data set's images are stored and prepared; travels inside ``DatasetInfo``.

    ``mean``/``std`` are per channel on the [0, 1] scale for uint8 and encoded pixels (as
    torchvision's CIFAR constants are), on the stored scale for float pixels.
    ``crop_padding`` is None when training batches are not augmented.
    """

    column: str
    shape: Shape
    storage: Storage
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int | None
    flip: bool


def storage_of(kind: pa.DataType, column: str, shape: Shape, where: str) -> Storage:
    """What a column's Arrow type holds, checked against the declared shape from the schema."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        if shape[0] not in _MODES:
            raise ConfigError(
                f"data.image.shape: encoded images decode to 1, 3 or 4 channels, not "
                f"{shape[0]} (column {column!r} in {where!r}); fix the shape"
            )
        return "encoded"
    values, width = kind, 1
    while pa.types.is_fixed_size_list(values):
        width *= values.list_size
        values = values.value_type
    if _is_variable_list(values):
        width, values = 0, values.value_type  # variable length: checked row by row on reading
    if not (pa.types.is_integer(values) or pa.types.is_floating(values)) or values == kind:
        raise ConfigError(
            f"data.image.column: column {column!r} has type {kind} in {where!r}; images must be "
            "lists of C*H*W numbers (uint8 0..255 or float) or encoded PNG/JPEG bytes"
        )
    if width and width != int(np.prod(shape)):
        raise ConfigError(_length_message(column, width, shape, repr(where)))
    return "uint8" if pa.types.is_uint8(values) else "float"


def decode(
    column: pa.ChunkedArray | pa.Array, storage: Storage, shape: Shape, name: str
) -> np.ndarray:
    """[N, C, H, W] pixels in their stored type: uint8, or float32 for float columns."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ConfigError(f"data.image.column: column {name!r} has missing images")
    if storage == "encoded":
        return _decode_files(column, shape, name)
    values = column
    while pa.types.is_fixed_size_list(values.type) or _is_variable_list(values.type):
        if _is_variable_list(values.type):
            lengths = values.value_lengths().to_numpy(zero_copy_only=False)
            wrong = np.flatnonzero(lengths != int(np.prod(shape)))
            if len(wrong):
                row = f"row {wrong[0]} of a row group"
                raise ConfigError(_length_message(name, int(lengths[wrong[0]]), shape, row))
        values = values.flatten()
    dtype = np.uint8 if storage == "uint8" else np.float32
    pixels = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return pixels.reshape(len(column), *shape)


def _decode_files(column: pa.Array, shape: Shape, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    out = np.empty((len(column), height, width, channels), dtype=np.uint8)
    for i, blob in enumerate(column.to_pylist()):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                pixels = np.asarray(image.convert(_MODES[channels]))
        except (UnidentifiedImageError, OSError) as err:
            raise ConfigError(
                f"data.image.column: row {i} of column {name!r} is not a readable image ({err})"
            ) from None
        if pixels.shape[:2] != (height, width):
            raise ConfigError(
                f"data.image.shape: column {name!r} holds a {pixels.shape[0]}x{pixels.shape[1]} "
                f"image but the declared shape {list(shape)} wants {height}x{width}; fix "
                "data.image.shape or resize the images"
            )
        out[i] = pixels.reshape(height, width, channels)
    return out.transpose(0, 3, 1, 2)


def _is_variable_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _length_message(column: str, length: int, shape: Shape, where: str) -> str:
    return (
        f"data.image.shape: column {column!r} holds {length} values per image in {where}, but "
        f"the declared shape {list(shape)} needs {int(np.prod(shape))}; fix data.image.shape"
    )


def to_unit_scale(pixels: np.ndarray) -> np.ndarray:
    """float32 pixels: uint8 divided by 255, floats as stored."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / np.float32(255)
    return pixels.astype(np.float32, copy=False)


def normalise(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Per-channel standardisation of float [N, C, H, W] pixels."""
    centre = np.asarray(mean, dtype=np.float32)[:, None, None]
    scale = np.asarray(std, dtype=np.float32)[:, None, None]
    return (pixels - centre) / scale


def augmentation_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of one train batch's augmentation: the same batch of the same epoch is
    augmented identically in a resumed run, and differently in every other epoch."""
    return np.random.default_rng([_AUGMENT_SALT, seed, epoch, batch])


def random_crop_flip(
    pixels: np.ndarray, rng: np.random.Generator, padding: int, flip: bool
) -> np.ndarray:
    """The CIFAR recipe of the ResNet and AugLocal papers: pad each image with ``padding``
    zeros on every side, crop back to its size at a uniformly drawn offset, then mirror it
    left to right with probability 1/2 (when ``flip``)."""
    n, c, h, w = pixels.shape
    padded = np.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=pixels.dtype)
    padded[:, :, padding : padding + h, padding : padding + w] = pixels
    top = rng.integers(0, 2 * padding + 1, size=n)
    left = rng.integers(0, 2 * padding + 1, size=n)
    mirror = rng.random(n) < 0.5
    rows = (top[:, None] + np.arange(h))[:, None, :, None]
    cols = left[:, None] + np.arange(w)
    if flip:
        cols = np.where(mirror[:, None], cols[:, ::-1], cols)
    index = np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None]
    return padded[(*index, rows, cols[:, None, None, :])]


class ChannelMoments:
    """Running per-channel mean and standard deviation over batches of float pixels,
    accumulated in float64 so a long data set does not lose precision."""

    def __init__(self, channels: int) -> None:
        self._sum = np.zeros(channels)
        self._squares = np.zeros(channels)
        self._count = 0

    def add(self, pixels: np.ndarray) -> None:
        values = pixels.astype(np.float64).transpose(1, 0, 2, 3).reshape(pixels.shape[1], -1)
        self._sum += values.sum(axis=1)
        self._squares += np.square(values).sum(axis=1)
        self._count += values.shape[1]

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean = self._sum / max(self._count, 1)
        var = np.maximum(self._squares / max(self._count, 1) - np.square(mean), 0.0)
        std = np.where(var > 0, np.sqrt(var), 1.0)  # a constant channel is left unscaled
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
