"""Where a run's data comes from, checked up front so mistakes surface before any worker starts.

User data is validated from Parquet footers (schemas and row counts); rows are scanned only
when something has to be measured: the number of classes, an image set's channel statistics.
Text is tokenised here, once, into a cached token file (see ``orchestrator.data.tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.data import files, footers, images, tokens
from orchestrator.data.builtin import BuiltinDataset, builtin_dataset, materialize
from orchestrator.data.images import ImageFormat
from orchestrator.data.spec import InputKind, InputSpec
from orchestrator.data.split import held_out
from orchestrator.data.tokens import TokenFormat
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import DataConfig, TextConfig


@dataclass(frozen=True)
class DatasetInfo:
    """Everything a worker needs to stream the data; small and picklable for Ray.

    ``train`` and ``test`` are Parquet files or directories for tables and images, token files
    for text. ``test`` is None when held-out examples (rows, or windows of text) are split
    off train by ``test_fraction``.
    """

    name: str
    input: InputSpec  # one example as a network sees it
    train: str
    test: str | None
    test_fraction: float
    features: tuple[str, ...] = ()  # a table's feature columns
    label: str = "y"  # the class column of tables and images
    image: ImageFormat | None = None
    tokens: TokenFormat | None = None

    @property
    def num_features(self) -> int:
        """Values in one example, flattened: a table's feature width, an image's C*H*W."""
        return math.prod(self.input.shape)

    @property
    def num_classes(self) -> int:
        """Classes of a label, or a language model's vocabulary."""
        return self.input.num_classes


def resolve_dataset(data: DataConfig, num_classes: int | None = None) -> DatasetInfo:
    """Validate the data section, generating a built-in dataset or token file on first use.
    ``num_classes``: what ``check_dataset`` counted in your data, so it is not counted again."""
    _one_source(data)
    return _builtin_info(data) if data.dataset is not None else _user_info(data, num_classes)


def _builtin_info(data: DataConfig) -> DatasetInfo:
    spec, size = _checked_builtin(data)
    location = materialize(spec, size, data.root)
    name = f"{spec.name}-{size}"
    if spec.kind == "tokens":
        train, test = files.join(location, "train.txt"), files.join(location, "test.txt")
        return _text_info(data, name, train, test)
    train, test = files.join(location, "train"), files.join(location, "test")
    example = InputSpec(spec.kind, spec.shape, data.num_classes or spec.num_classes)
    image = _image_format(data, spec.shape, "float", train, spec) if spec.kind == "image" else None
    return _parquet_info(data, name, example, train, test, image)


def _user_info(data: DataConfig, num_classes: int | None) -> DatasetInfo:
    name = files.absolute(data.path).rsplit("/", 1)[-1]
    name = name.removesuffix(".parquet").removesuffix(".txt")
    kind = data.kind
    if kind == "tokens":
        return _text_info(data, name, data.path, data.test_path)
    found_train, found_test, layout = _checked_user_data(data, kind)
    classes = (
        data.num_classes
        or num_classes
        or footers.count_classes(data.label, [found_train, *found_test])
    )
    train = files.absolute(data.path)
    test = None if data.test_path is None else files.absolute(data.test_path)
    if kind == "table":
        return _parquet_info(data, name, InputSpec("table", (layout,), classes), train, test, None)
    shape = data.image.shape
    image = _image_format(data, shape, layout, train, None)
    return _parquet_info(data, name, InputSpec("image", shape, classes), train, test, image)


def _parquet_info(
    data: DataConfig,
    name: str,
    example: InputSpec,
    train: str,
    test: str | None,
    image: ImageFormat | None,
) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        input=example,
        train=train,
        test=test,
        test_fraction=data.test_fraction,
        features=tuple(data.features) if image is None else (),
        label=data.label,
        image=image,
    )


def check_dataset(data: DataConfig) -> int | None:
    """The checks of resolve_dataset that need no generated data, run before anything
    starts: one vectorised pass over the label and float feature columns (ranges, NaN).

    Returns the class count of your table or image data that this pass found (None for a
    built-in or text), for resolve_dataset, so the label column is read once."""
    _one_source(data)
    if data.dataset is not None:
        _checked_builtin(data)
        return None
    kind = data.kind
    if kind == "tokens":
        text = _text_config(data)
        tokens.load_tokenizer(text.tokenizer)
        for field, location in (("data.path", data.path), ("data.test_path", data.test_path)):
            if location is not None:
                _checked_text_source(field, location, text)
        return None
    train, tests, _ = _checked_user_data(data, kind)
    features = tuple(data.features) if kind == "table" else ()
    return footers.check_values(data.label, features, [train, *tests], data.num_classes)


def _one_source(data: DataConfig) -> None:
    if (data.dataset is None) == (data.path is None):
        raise ConfigError(
            "data.dataset / data.path: set exactly one, a built-in name or your Parquet data"
        )


def _checked_builtin(data: DataConfig) -> tuple[BuiltinDataset, int]:
    spec, size = builtin_dataset(data.dataset, data.size)
    sections = {"image": data.image, "text": data.text}
    wanted = {"table": None, "image": "image", "tokens": "text"}[spec.kind]
    for section, value in sections.items():
        if value is not None and section != wanted:
            raise ConfigError(
                f"data.{section}: the built-in {spec.name!r} holds {spec.kind}, not "
                f"{'images' if section == 'image' else 'text'}; remove data.{section}"
            )
    if list(data.features) != ["x"]:
        raise ConfigError(
            f"data.features: {list(data.features)!r} is not allowed for the built-in "
            f"{spec.name!r}; its features are the column 'x' (remove data.features)"
        )
    if data.label != "y":
        raise ConfigError(
            f"data.label: {data.label!r} is not allowed for the built-in {spec.name!r}; "
            "its label column is 'y' (remove data.label)"
        )
    if data.num_classes is not None and data.num_classes < spec.num_classes:
        raise ConfigError(
            f"data.num_classes: {data.num_classes} is too few for the built-in "
            f"{spec.name!r}, which has {spec.num_classes} classes"
        )
    if spec.kind != "tokens" and data.batch_size > size:
        # the exact training count comes from generating the data; a batch above the whole
        # set is wrong whatever the split, and is caught here before anything starts
        raise ConfigError(
            f"data.batch_size: {data.batch_size} is more than all {size} examples of the "
            f"built-in {spec.name!r}; lower data.batch_size"
            + ("" if spec.fixed_size else " or raise data.size")
        )
    if data.image is not None:
        _check_builtin_image(data, spec)
    if data.text is not None and data.text.column is not None:
        raise ConfigError(
            f"data.text.column: the built-in {spec.name!r} is plain text, which has no columns; "
            "remove data.text.column"
        )
    return spec, size


def _check_builtin_image(data: DataConfig, spec: BuiltinDataset) -> None:
    if data.image.column != spec.column:
        raise ConfigError(
            f"data.image.column: {data.image.column!r} is not allowed for the built-in "
            f"{spec.name!r}, whose images are the column {spec.column!r} (remove it)"
        )
    if data.image.shape is not None and tuple(data.image.shape) != spec.shape:
        raise ConfigError(
            f"data.image.shape: {list(data.image.shape)} is not the shape of the built-in "
            f"{spec.name!r}, {list(spec.shape)}; remove data.image.shape"
        )
    if data.image.mean is not None and len(data.image.mean) != spec.shape[0]:
        raise ConfigError(
            f"data.image.mean: {len(data.image.mean)} values for the {spec.shape[0]} channel(s) "
            f"of the built-in {spec.name!r}; give one per channel"
        )


def _checked_user_data(
    data: DataConfig, kind: InputKind
) -> tuple[footers.Files, list[footers.Files], int | str]:
    """The train files, the test files (if any) and the layout they agree on: a table's
    feature width, or how an image column is stored."""
    if kind == "image":
        column, shape = data.image.column, tuple(data.image.shape)

        def layout(schema, path):
            if column not in schema.names:
                raise ConfigError(
                    f"data.image.column: column {column!r} is not in {path!r}; its columns "
                    f"are {schema.names}"
                )
            return images.storage_of(schema.field(column).type, column, shape, path)

        subject = f"data.image.column: how column {column!r} is stored"

        def described(storage):
            return f"images stored as {storage} in column {column!r}"

    else:
        features = tuple(data.features)

        def layout(schema, path):
            return footers.feature_width(schema, features, path)

        subject = f"data.features: the width of {list(features)}"

        def described(width):
            return f"{width} features in {list(features)}"

    train = footers.find_parquet("data.path", data.path)
    found = footers.checked_files("data.path", train, layout, subject, data.label)
    if data.test_path is None:
        return train, [], found
    test = footers.find_parquet("data.test_path", data.test_path)
    test_found = footers.checked_files("data.test_path", test, layout, subject, data.label)
    if test_found != found:
        raise ConfigError(
            f"data.test_path: {data.test_path!r} has {described(test_found)} but data.path has "
            f"{described(found)}; both must have the same columns"
        )
    return train, [test], found


def _image_format(
    data: DataConfig,
    shape: tuple[int, int, int],
    storage: images.Storage,
    train: str,
    builtin: BuiltinDataset | None,
) -> ImageFormat:
    """The column, normalisation and augmentation of an image set; the channel statistics are
    measured on the train split unless the config gives them."""
    config = data.image
    column = builtin.column if builtin else config.column
    augment = config is None or config.augment
    padding = config.crop_padding if config else None
    flip = config.flip if config else None
    if padding is None:
        padding = builtin.crop_padding if builtin else 4
    if flip is None:
        flip = builtin.flip if builtin else True
    if config is not None and config.mean is not None:
        mean, std = tuple(config.mean), tuple(config.std)
    else:
        splitting = data.test_path is None and builtin is None
        fraction = data.test_fraction if splitting else None
        mean, std = _channel_statistics(train, column, storage, shape, fraction)
    return ImageFormat(column, shape, storage, mean, std, padding if augment else None, flip)


def _channel_statistics(
    location: str,
    column: str,
    storage: images.Storage,
    shape: tuple[int, int, int],
    test_fraction: float | None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the train split, one row group at a time; rows held out
    by ``test_fraction`` are skipped by the same positions the batch stream uses."""
    fs, path = files.resolve(location)
    moments = images.ChannelMoments(shape[0])
    offset = 0
    for file in files.parquet_files(fs, path):
        with fs.open_input_file(file) as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=[column], use_threads=False)
                pixels = images.decode(table.column(0), storage, shape, column)
                if test_fraction is not None:
                    positions = np.arange(offset, offset + len(pixels))
                    pixels = pixels[~held_out(positions, test_fraction)]
                offset += table.num_rows
                moments.add(images.to_unit_scale(pixels))
    return moments.mean_std()


def _text_config(data: DataConfig) -> TextConfig:
    from orchestrator.config import TextConfig

    return data.text or TextConfig()


def _checked_text_source(field: str, location: str, text: TextConfig) -> str | None:
    """The text column to read, None for a text file; Parquet schemas are checked."""
    if files.is_text_file(location):
        try:
            fs, path = files.resolve(location)
            found = files.exists(fs, path)
        except (pa.ArrowInvalid, OSError) as err:  # a bad URI, an unreachable store
            raise files.unopenable(field, location, err) from None
        if not found:
            raise ConfigError(f"{field}: {location!r} does not exist; give a UTF-8 text file")
        return None
    column = text.column or "text"

    def layout(schema, path):
        return footers.text_column(schema, column, path)

    found = footers.find_parquet(field, location)
    footers.checked_files(field, found, layout, "data.text.column: the text column", None)
    return column


def _check_window_split(tokens: int, context: int, fraction: float) -> None:
    """Held-out windows are chosen by a hash of their index: a short text can leave none
    (evaluation would have nothing to score) or none for training."""
    windows = (tokens - 1) // context
    test = int(held_out(np.arange(windows), fraction).sum())
    if test == 0 or test == windows:
        side = "held out" if test == 0 else "left for training"
        raise ConfigError(
            f"data.test_fraction: {fraction} of the {windows} windows of {context} tokens leaves "
            f"none {side}; add text, lower data.text.context, change data.test_fraction, or "
            "give data.test_path"
        )


def _text_info(data: DataConfig, name: str, train: str, test: str | None) -> DatasetInfo:
    text = _text_config(data)
    tokenizer = tokens.load_tokenizer(text.tokenizer)
    sources = {"data.path": (train, "train"), "data.test_path": (test, "test")}
    located: dict[str, str] = {}
    for field, (source, split) in sources.items():
        if source is None:
            continue
        column = _checked_text_source(field, source, text)
        location, count = tokens.cached_tokens(
            field, source, column, tokenizer, data.root, f"{name}-{split}"
        )
        if count <= text.context:
            raise ConfigError(
                f"data.text.context: a window of {text.context} + 1 tokens does not fit in the "
                f"{count} tokens of {field} {source!r}; lower data.text.context or add text"
            )
        located[field] = location
        if test is None:
            _check_window_split(count, text.context, data.test_fraction)
    spec = InputSpec("tokens", (text.context,), tokenizer.vocab_size)
    layout = TokenFormat(tokenizer.dtype.name, tokenizer.vocab_size, text.context, tokenizer.name)
    return DatasetInfo(
        name=name,
        input=spec,
        train=located["data.path"],
        test=located.get("data.test_path"),
        test_fraction=data.test_fraction,
        tokens=layout,
    )
