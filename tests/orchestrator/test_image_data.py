"""Image data sets: reading list and encoded columns, normalisation, seeded augmentation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from orchestrator.config import DataConfig
from orchestrator.data import check_dataset, resolve_dataset
from orchestrator.data.images import augmentation_rng, random_crop_flip
from orchestrator.data.spec import InputSpec
from orchestrator.data.split import held_out
from orchestrator.data.stream import BatchStream
from orchestrator.errors import ConfigError

SHAPE = (3, 8, 8)


def pixels(count: int, seed: int = 0) -> np.ndarray:
    """uint8 [N, C, H, W] images with some structure: a bright square at a random place."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(count, *SHAPE), dtype=np.uint8)
    for image, (top, left) in zip(images, rng.integers(0, 5, size=(count, 2)), strict=True):
        image[:, top : top + 3, left : left + 3] = 200
    return images


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(path: Path, images: np.ndarray, how: str, row_group_size: int = 25) -> Path:
    """One Parquet file whose 'image' column stores the images the way ``how`` names."""
    flat = images.reshape(len(images), -1)
    if how == "flat":
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    elif how == "nested":
        rows = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), SHAPE[2])
        planes = pa.FixedSizeListArray.from_arrays(rows, SHAPE[1])
        column = pa.FixedSizeListArray.from_arrays(planes, SHAPE[0])
    elif how == "variable":
        column = pa.array(list(flat), pa.list_(pa.uint8()))
    elif how == "float":
        column = pa.array(
            list(flat.astype(np.float32) / 255), pa.list_(pa.float32(), flat.shape[1])
        )
    else:
        column = pa.array([png(image) for image in images], pa.binary())
    labels = pa.array(np.arange(len(images)) % 5, pa.int64())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": column, "y": labels}), path, row_group_size=row_group_size)
    return path


def image_config(tmp_path: Path, path: Path, **image: Any) -> DataConfig:
    section = {"shape": list(SHAPE), **image}
    return DataConfig(path=str(path), image=section, root=str(tmp_path / "root"), batch_size=16)


def batches(info, seed: int = 3, steps: range = range(12)) -> list[tuple[torch.Tensor, ...]]:
    stream = BatchStream(info, "train", 16, seed=seed, shuffle_window=2)
    return [stream.batch(t) for t in steps]


@pytest.mark.parametrize("how", ["nested", "variable", "float", "png"])
def test_every_storage_gives_the_tensors_of_flat_uint8_lists(tmp_path: Path, how: str) -> None:
    images = pixels(200)
    flat = resolve_dataset(
        image_config(tmp_path, write_images(tmp_path / "flat.parquet", images, "flat"))
    )
    other = resolve_dataset(
        image_config(tmp_path, write_images(tmp_path / f"{how}.parquet", images, how))
    )
    assert flat.input == other.input == InputSpec("image", SHAPE, 5)
    assert np.allclose(flat.image.mean, other.image.mean) and np.allclose(
        flat.image.std, other.image.std
    )
    for (x, y), (x2, y2) in zip(batches(flat), batches(other), strict=True):
        assert x.shape == (16, *SHAPE) and x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(x, x2)
        assert torch.equal(y, y2)
    evaluated = [list(BatchStream(info, "test", 16, seed=0)) for info in (flat, other)]
    for (x, _), (x2, _) in zip(*evaluated, strict=True):
        torch.testing.assert_close(x, x2)


def test_a_shape_that_disagrees_with_the_column_names_both(tmp_path: Path) -> None:
    path = write_images(tmp_path / "flat.parquet", pixels(20), "flat")
    config = image_config(tmp_path, path)
    config.image.shape = (1, 8, 8)
    with pytest.raises(
        ConfigError,
        match=r"data\.image\.shape: column 'image' holds 192 values.*\[1, 8, 8\] needs 64",
    ):
        check_dataset(config)


def test_rows_of_the_wrong_length_are_named_when_read(tmp_path: Path) -> None:
    images = pixels(20).reshape(20, -1)
    ragged = pa.array(
        [list(row) for row in images[:-1]] + [list(images[-1, :100])], pa.list_(pa.uint8())
    )
    path = tmp_path / "ragged.parquet"
    pq.write_table(
        pa.table({"image": ragged, "y": np.zeros(20, np.int64) + np.arange(20) % 2}), path
    )
    with pytest.raises(ConfigError, match=r"column 'image' holds 100 values.*needs 192"):
        resolve_dataset(image_config(tmp_path, path))


def test_an_encoded_image_of_another_size_is_named(tmp_path: Path) -> None:
    path = write_images(tmp_path / "png.parquet", pixels(10), "png")
    config = image_config(tmp_path, path)
    config.image.shape = (3, 16, 16)
    with pytest.raises(ConfigError, match=r"data\.image\.shape: .*8x8 image.*\[3, 16, 16\]"):
        resolve_dataset(config)


def test_train_pixels_are_normalised_per_channel(tmp_path: Path) -> None:
    images = pixels(300)
    images[:, 1] //= 4  # channels on different scales
    info = resolve_dataset(
        image_config(tmp_path, write_images(tmp_path / "a.parquet", images, "flat"))
    )
    train = torch.cat([x for x, _ in BatchStream(info, "train", 16, seed=0)])
    assert 200 < len(train) < 300  # the held-out tenth is not measured
    torch.testing.assert_close(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        train.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0
    )
    assert info.image.mean[1] < info.image.mean[0] / 2


def test_given_statistics_are_used_as_given(tmp_path: Path) -> None:
    images = pixels(40)
    path = write_images(tmp_path / "a.parquet", images, "flat")
    info = resolve_dataset(
        image_config(tmp_path, path, mean=[0.5] * 3, std=[0.25] * 3, augment=False)
    )
    x = torch.cat([x for x, _ in BatchStream(info, "train", 8, seed=0)])
    train = images[~held_out(np.arange(40), 0.1)].astype(np.float32) / 255
    torch.testing.assert_close(x, torch.from_numpy((train - 0.5) / 0.25))


def test_augmentation_is_a_padded_crop_then_maybe_a_mirror() -> None:
    images = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4) + 1
    out = random_crop_flip(images, augmentation_rng(0, 0, 0), padding=2, flip=True)
    rng = augmentation_rng(0, 0, 0)
    top, left, mirror = rng.integers(0, 5, 2), rng.integers(0, 5, 2), rng.random(2) < 0.5
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(2):
        crop = padded[i, :, top[i] : top[i] + 4, left[i] : left[i] + 4]
        assert np.array_equal(out[i], crop[..., ::-1] if mirror[i] else crop)
    assert np.array_equal(random_crop_flip(images, augmentation_rng(0, 0, 0), 0, False), images)


def test_augmentation_is_fixed_per_seed_epoch_and_batch_and_varies_across_epochs() -> None:
    images = np.random.default_rng(1).random((64, 3, 8, 8), dtype=np.float32)

    def augmented(seed: int, epoch: int, batch: int) -> np.ndarray:
        return random_crop_flip(images, augmentation_rng(seed, epoch, batch), 2, True)

    assert np.array_equal(augmented(0, 1, 2), augmented(0, 1, 2))
    for other in [(0, 2, 2), (0, 1, 3), (1, 1, 2)]:
        assert not np.array_equal(augmented(0, 1, 2), augmented(*other))


def test_a_resumed_stream_sees_the_same_augmented_batches(tmp_path: Path) -> None:
    info = resolve_dataset(
        image_config(tmp_path, write_images(tmp_path / "a.parquet", pixels(200), "png"))
    )
    stream = BatchStream(info, "train", 16, seed=5, shuffle_window=2)
    per_epoch = stream.batches_per_epoch
    sequential = [stream.batch(t) for t in range(2 * per_epoch + 2)]
    for t in (0, 3, per_epoch - 1, per_epoch, 2 * per_epoch + 1):
        x, y = BatchStream(info, "train", 16, seed=5, shuffle_window=2).batch(t)
        assert torch.equal(x, sequential[t][0]) and torch.equal(y, sequential[t][1])
    plain = resolve_dataset(
        image_config(
            tmp_path, write_images(tmp_path / "b.parquet", pixels(200), "png"), augment=False
        )
    )
    unaugmented = BatchStream(plain, "train", 16, seed=5, shuffle_window=2).batch(0)
    assert torch.equal(unaugmented[1], sequential[0][1]) and not torch.equal(
        unaugmented[0], sequential[0][0]
    )


def test_the_built_in_digit_images(dataset_root: Path) -> None:
    info = resolve_dataset(DataConfig(dataset="digits-images", root=str(dataset_root)))
    assert info.input == InputSpec("image", (1, 8, 8), 10)
    assert (info.num_features, info.num_classes, info.name) == (64, 10, "digits-images-1797")
    assert (info.image.crop_padding, info.image.flip) == (1, False)
    x, y = BatchStream(info, "train", 100, seed=0).batch(0)
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    test = list(BatchStream(info, "test", 100, seed=0))
    train = list(BatchStream(info, "train", 100, seed=0))
    assert sum(len(y) for _, y in test) + sum(len(y) for _, y in train) == 1797
    labels = torch.cat([y for _, y in test])
    assert torch.bincount(labels).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    no_augment = DataConfig(
        dataset="digits-images", image={"augment": False}, root=str(dataset_root)
    )
    assert resolve_dataset(no_augment).image.crop_padding is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"dataset": "digits-images", "text": {}},
            r"data\.text: the built-in 'digits-images' holds image",
        ),
        ({"dataset": "digits", "image": {}}, r"data\.image: the built-in 'digits' holds table"),
        (
            {"dataset": "digits-images", "image": {"shape": [3, 8, 8]}},
            r"data\.image\.shape: \[3, 8, 8\]",
        ),
        (
            {"dataset": "digits-images", "image": {"column": "pixels"}},
            r"data\.image\.column: 'pixels'",
        ),
        (
            {"dataset": "digits-images", "image": {"mean": [0, 0], "std": [1, 1]}},
            r"data\.image\.mean: 2 values",
        ),
    ],
)
def test_built_in_image_misconfigurations(tmp_path: Path, fields: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        check_dataset(DataConfig(root=str(tmp_path), **fields))
    assert not (tmp_path / "digits-images-1797").exists()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"path": "p", "image": {}}, r"data\.image\.shape: required"),
        (
            {"path": "p", "image": {"shape": [3, 4, 4]}, "features": ["a"]},
            r"data\.features applies to tables",
        ),
        ({"path": "p", "image": {"shape": [3, 4, 4]}, "text": {}}, r"images or text, not both"),
        ({"path": "a.txt", "image": {"shape": [3, 4, 4]}}, r"images or text, not both"),
        (
            {"dataset": "d", "image": {"mean": [0.5]}},
            r"both data\.image\.mean and data\.image\.std",
        ),
        ({"dataset": "d", "image": {"mean": [0.5], "std": [0.0]}}, r"data\.image\.std: .*positive"),
        (
            {"dataset": "d", "image": {"shape": [3, 4, 4], "mean": [0.5], "std": [1]}},
            r"1 values for 3 channels",
        ),
        ({"dataset": "d", "image": {"augment": False, "flip": True}}, r"augment: false turns off"),
        ({"dataset": "d", "image": {"shape": [0, 4, 4]}}, r"greater than 0"),
    ],
)
def test_bad_image_sections_are_refused_at_load(fields: dict, expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        DataConfig(**fields)
