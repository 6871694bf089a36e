"""What Parquet footers tell before any row is read: the files of a location, their columns'
types and row counts; and the one scan a footer cannot replace, counting classes."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data import files
from orchestrator.data.spec import MAX_CLASSES
from orchestrator.errors import ConfigError

Files = tuple[pafs.FileSystem, list[str]]
Layout = Callable[[pa.Schema, str], Hashable]  # (schema, path) -> what every file must share


def find_parquet(field: str, location: str) -> Files:
    try:
        fs, path = files.resolve(location)
        found = files.parquet_files(fs, path)
    except FileNotFoundError:
        raise ConfigError(
            f"{field}: {location!r} does not exist; give a Parquet file or a directory of "
            "Parquet files, as a local path or a URI such as s3://bucket/prefix"
        ) from None
    except (pa.ArrowInvalid, OSError) as err:  # an unknown scheme, an unreachable store
        raise files.unopenable(field, location, err) from None
    if not found:
        raise ConfigError(
            f"{field}: {location!r} holds no *.parquet files; point it at a Parquet file or a "
            "directory containing some"
        )
    return fs, found


def checked_files(
    field: str, found: Files, layout: Layout, subject: str, label: str | None
) -> Hashable:
    """Check every file's schema from its footer; return the layout they share.

    ``layout`` checks the example columns of one file and returns what all files must agree
    on (a feature width, an image storage); ``subject`` is the config field and what the
    layout is, for the error when they do not.
    """
    fs, paths = found
    layouts: dict[Hashable, str] = {}
    rows = 0
    for path in paths:
        try:
            with fs.open_input_file(path) as handle:
                footer = pq.ParquetFile(handle)
                schema, count = footer.schema_arrow, footer.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as err:
            raise ConfigError(f"{field}: {path!r} is not a readable Parquet file ({err})") from None
        layouts.setdefault(layout(schema, path), path)
        if label is not None:
            _check_label(schema, label, path)
        rows += count
    if len(layouts) > 1:
        raise ConfigError(
            f"{subject}: the files of {field} disagree: "
            + ", ".join(f"{value} in {path!r}" for value, path in layouts.items())
        )
    if rows == 0:
        raise ConfigError(f"{field}: {paths[0].rsplit('/', 1)[0]!r} has no rows")
    return next(iter(layouts))


def feature_width(schema: pa.Schema, features: tuple[str, ...], path: str) -> int:
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


def count_classes(label: str, sources: list[Files]) -> int:
    """max(label) + 1 over every source, reading the label column alone, a batch at a time."""
    return check_values(label, (), sources, None)


def check_values(
    label: str, features: tuple[str, ...], sources: list[Files], num_classes: int | None
) -> int:
    """Scan the label and float feature columns once, vectorised per batch: labels must be
    class ids 0..K-1 (K: ``num_classes``, or max + 1 up to ``MAX_CLASSES``) and features
    finite, or training ends in NaN or fails inside a worker. Returns K."""
    low, high = 0, -1
    missing, bad = 0, dict.fromkeys(features, 0)
    for fs, paths in sources:
        dataset = ds.dataset(paths, format="parquet", filesystem=fs)
        floats = [f for f in features if _holds_floats(dataset.schema.field(f).type)]
        for batch in dataset.to_batches(columns=[label, *floats]):
            column = batch.column(0)
            missing += column.null_count
            extremes = pc.min_max(column)
            if len(column) > column.null_count:
                low = min(low, extremes["min"].as_py())
                high = max(high, extremes["max"].as_py())
            for index, name in enumerate(floats, start=1):
                bad[name] += non_finite_rows(batch.column(index))
    if missing:
        raise ConfigError(
            f"data.label: column {label!r} has {missing} rows without a label; drop them"
        )
    for name, rows in bad.items():
        if rows:
            raise ConfigError(
                f"data.features: column {name!r} has {rows} rows with NaN, inf or missing "
                "values, which train to NaN; drop or impute those rows"
            )
    limit = num_classes or MAX_CLASSES
    if low < 0 or high < 1 or high >= limit:
        allowed = (
            f"0..{num_classes - 1} (data.num_classes is {num_classes}; raise it if the "
            "data has more classes)"
            if num_classes
            else f"0..K-1 with 2 <= K <= {MAX_CLASSES} (map other labels to class ids)"
        )
        raise ConfigError(
            f"data.label: column {label!r} holds labels from {low} to {high}; labels must be "
            f"class ids {allowed}"
        )
    return num_classes or high + 1


def _holds_floats(kind: pa.DataType) -> bool:
    if pa.types.is_fixed_size_list(kind):
        kind = kind.value_type
    return pa.types.is_floating(kind)


def non_finite_rows(column: pa.Array | pa.ChunkedArray) -> int:
    """Rows of a float column (or fixed-size list of floats) holding NaN, inf or a null."""
    if isinstance(column, pa.ChunkedArray):
        return sum(non_finite_rows(chunk) for chunk in column.chunks)
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        # Every slot's values, a null row's too (``flatten`` would skip those).
        values = column.values.slice(column.offset * width, len(column) * width)
        finite = pc.fill_null(pc.is_finite(values), False).to_numpy(zero_copy_only=False)
        bad = ~finite.reshape(-1, width).all(axis=1)
        if column.null_count:
            bad |= column.is_null().to_numpy(zero_copy_only=False)
        return int(bad.sum())
    finite = pc.fill_null(pc.is_finite(column), False)
    return len(column) - pc.sum(finite).as_py() if len(column) else 0


def text_column(schema: pa.Schema, column: str, path: str) -> str:
    """Check a Parquet text column; the layout all files share is its name."""
    if column not in schema.names:
        raise ConfigError(
            f"data.text.column: column {column!r} is not in {path!r}; its columns are "
            f"{schema.names}"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(
            f"data.text.column: column {column!r} has type {kind} in {path!r}; it must hold "
            "strings (UTF-8 text)"
        )
    return column
