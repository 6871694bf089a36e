"""Where a run's data comes from, checked up front so mistakes surface before any worker starts.

User data is validated from Parquet footers (schemas and row counts); only the label column is
ever scanned, and only when the number of classes has to be found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data import files
from orchestrator.data.builtin import BuiltinDataset, builtin_dataset, materialize
from orchestrator.data.spec import InputSpec
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import DataConfig


@dataclass(frozen=True)
class DatasetInfo:
    """Everything a worker needs to stream the data; small and picklable for Ray."""

    train: str  # path/URI of the train Parquet file or directory
    test: str | None  # None: held-out rows are split off train by test_fraction
    features: tuple[str, ...]
    label: str
    num_features: int
    num_classes: int
    test_fraction: float
    name: str

    @property
    def input(self) -> InputSpec:
        """One example as a network sees it."""
        return InputSpec("table", (self.num_features,), self.num_classes)


def resolve_dataset(data: DataConfig) -> DatasetInfo:
    """Validate the data section, generating a built-in dataset on first use."""
    _one_source(data)
    if data.dataset is not None:
        spec, size = _checked_builtin(data)
        location = materialize(spec, size, data.root)
        return DatasetInfo(
            train=files.join(location, "train"),
            test=files.join(location, "test"),
            features=tuple(data.features),
            label=data.label,
            num_features=spec.num_features,
            num_classes=data.num_classes or spec.num_classes,
            test_fraction=data.test_fraction,
            name=f"{spec.name}-{size}",
        )
    train, test, width = _checked_user_data(data)
    return DatasetInfo(
        train=files.absolute(data.path),
        test=None if data.test_path is None else files.absolute(data.test_path),
        features=tuple(data.features),
        label=data.label,
        num_features=width,
        num_classes=data.num_classes or _count_classes(data.label, [train, *test]),
        test_fraction=data.test_fraction,
        name=files.absolute(data.path).rsplit("/", 1)[-1].removesuffix(".parquet"),
    )


def check_dataset(data: DataConfig) -> None:
    """The checks of resolve_dataset that need neither generating data nor scanning rows."""
    _one_source(data)
    if data.dataset is not None:
        _checked_builtin(data)
    else:
        _checked_user_data(data)


_Files = tuple[pafs.FileSystem, list[str]]


def _one_source(data: DataConfig) -> None:
    if (data.dataset is None) == (data.path is None):
        raise ConfigError(
            "data.dataset / data.path: set exactly one, a built-in name or your Parquet data"
        )


def _checked_builtin(data: DataConfig) -> tuple[BuiltinDataset, int]:
    spec, size = builtin_dataset(data.dataset, data.size)
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
    return spec, size


def _checked_user_data(data: DataConfig) -> tuple[_Files, list[_Files], int]:
    """The train files, the test files (if any) and the feature width they agree on."""
    features, label = tuple(data.features), data.label
    train = _find_parquet("data.path", data.path)
    width = _checked_files("data.path", train, features, label)
    if data.test_path is None:
        return train, [], width
    test = _find_parquet("data.test_path", data.test_path)
    test_width = _checked_files("data.test_path", test, features, label)
    if test_width != width:
        raise ConfigError(
            f"data.test_path: {data.test_path!r} has {test_width} features in "
            f"{list(features)} but data.path has {width}; both must have the same columns"
        )
    return train, [test], width


def _find_parquet(field: str, location: str) -> _Files:
    fs, path = files.resolve(location)
    try:
        found = files.parquet_files(fs, path)
    except FileNotFoundError:
        raise ConfigError(
            f"{field}: {location!r} does not exist; give a Parquet file or a directory of "
            "Parquet files, as a local path or a URI such as s3://bucket/prefix"
        ) from None
    if not found:
        raise ConfigError(
            f"{field}: {location!r} holds no *.parquet files; point it at a Parquet file or a "
            "directory containing some"
        )
    return fs, found


def _checked_files(field: str, found: _Files, features: tuple[str, ...], label: str) -> int:
    """Check every file's schema from its footer; return the feature width they share."""
    fs, paths = found
    widths: dict[int, str] = {}
    rows = 0
    for path in paths:
        try:
            with fs.open_input_file(path) as handle:
                footer = pq.ParquetFile(handle)
                schema, count = footer.schema_arrow, footer.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as err:
            raise ConfigError(f"{field}: {path!r} is not a readable Parquet file ({err})") from None
        widths.setdefault(_feature_width(schema, features, path), path)
        _check_label(schema, label, path)
        rows += count
    if len(widths) > 1:
        raise ConfigError(
            f"data.features: the files of {field} disagree on the width of {list(features)}: "
            + ", ".join(f"{width} in {path!r}" for width, path in widths.items())
        )
    if rows == 0:
        raise ConfigError(f"{field}: {paths[0].rsplit('/', 1)[0]!r} has no rows")
    return next(iter(widths))


def _feature_width(schema: pa.Schema, features: tuple[str, ...], path: str) -> int:
    width = 0
    for name in features:
        if name not in schema.names:
            raise ConfigError(
                f"data.features: column {name!r} is not in {path!r}; its columns are {schema.names}"
            )
        kind = schema.field(name).type
        if _is_number(kind):
            width += 1
        elif pa.types.is_fixed_size_list(kind) and _is_number(kind.value_type):
            width += kind.list_size
        else:
            raise ConfigError(
                f"data.features: column {name!r} has type {kind} in {path!r}, which is not "
                "allowed; use numeric scalar columns or fixed_size_list<float>[n] columns "
                "(cast variable-length lists to a fixed size)"
            )
    return width


def _check_label(schema: pa.Schema, label: str, path: str) -> None:
    if label not in schema.names:
        raise ConfigError(
            f"data.label: column {label!r} is not in {path!r}; its columns are {schema.names}"
        )
    kind = schema.field(label).type
    if not pa.types.is_integer(kind):
        raise ConfigError(
            f"data.label: column {label!r} has type {kind} in {path!r}, which is not allowed; "
            "labels must be integer class ids 0..K-1 (map class names to integers first)"
        )


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _count_classes(label: str, sources: list[_Files]) -> int:
    """max(label) + 1 over every source, reading the label column alone, a batch at a time."""
    low, high = 0, -1
    for fs, paths in sources:
        dataset = ds.dataset(paths, format="parquet", filesystem=fs)
        for batch in dataset.to_batches(columns=[label]):
            column = batch.column(0)
            if column.null_count:
                raise ConfigError(f"data.label: column {label!r} has missing values; drop them")
            extremes = pc.min_max(column)
            if len(column):
                low = min(low, extremes["min"].as_py())
                high = max(high, extremes["max"].as_py())
    if low < 0 or high < 1:
        raise ConfigError(
            f"data.label: column {label!r} holds labels from {low} to {high}; labels must be "
            "class ids 0..K-1 with at least two classes"
        )
    return high + 1
