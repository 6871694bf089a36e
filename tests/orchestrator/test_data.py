"""Tests for orchestrator.data: built-in generation, user-data validation and batch streams."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.data import BUILTIN_DATASETS, check_dataset, files, resolve_dataset
from orchestrator.data.builtin import materialize
from orchestrator.data.parquet_rows import ParquetRows
from orchestrator.data.source import DatasetInfo
from orchestrator.data.stream import BatchStream
from orchestrator.errors import ConfigError


def data_config(tmp_path: Path, **fields: Any) -> types.SimpleNamespace:
    """A duck-typed stand-in for orchestrator.config.DataConfig with its defaults."""
    defaults: dict[str, Any] = dict(
        dataset=None,
        path=None,
        test_path=None,
        features=["x"],
        label="y",
        num_classes=None,
        test_fraction=0.1,
        batch_size=32,
        size=None,
        root=str(tmp_path / "datasets"),
        image=None,
        text=None,
        kind="table",  # DataConfig.kind of a table's section
    )
    return types.SimpleNamespace(**{**defaults, **fields})


def write_rows(path: Path, ids: np.ndarray, row_group_size: int = 50) -> None:
    """Rows whose scalar feature 'id' names them; 'v' is a 3-wide list derived from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.repeat(ids.astype(np.float32), 3) * np.tile(np.float32([1, -1, 0.5]), len(ids))
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "v": pa.FixedSizeListArray.from_arrays(pa.array(values), 3),
            "label": pa.array(ids % 4, pa.int16()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """600 rows over three files (sorted names differ from write order) plus files to ignore."""
    root = tmp_path / "user"
    write_rows(root / "part-b.parquet", np.arange(200, 400))
    write_rows(root / "part-a.parquet", np.arange(0, 200))
    write_rows(root / "sub" / "part-c.parquet", np.arange(400, 600))
    (root / "_SUCCESS").write_text("")
    (root / "README.txt").write_text("not data")
    write_rows(root / ".hidden" / "part-z.parquet", np.arange(1000, 1010))
    return root


def user_info(tmp_path: Path, user_dir: Path, **fields: Any) -> DatasetInfo:
    return resolve_dataset(
        data_config(tmp_path, path=str(user_dir), features=["id", "v"], label="label", **fields)
    )


def ids_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return [int(i) for x, _ in batches for i in x[:, 0]]


def read_split(location: str, split: str) -> pa.Table:
    return pq.read_table(files.join(location, split))


# Built-in datasets


def test_builtin_generation_is_reused_not_repeated(tmp_path: Path, monkeypatch) -> None:
    config = data_config(tmp_path, dataset="teacher", size=3000)
    info = resolve_dataset(config)
    written = {p: p.stat().st_mtime_ns for p in Path(config.root).rglob("*") if p.is_file()}

    def no_generation(split: str, size: int):
        raise AssertionError("the dataset was generated again")

    spec = dataclasses.replace(BUILTIN_DATASETS["teacher"], rows=no_generation)
    monkeypatch.setitem(BUILTIN_DATASETS, "teacher", spec)
    assert resolve_dataset(config) == info
    assert {p: p.stat().st_mtime_ns for p in Path(config.root).rglob("*") if p.is_file()} == written
    assert info.name == "teacher-3000"
    assert (info.num_features, info.num_classes) == (32, 10)


def test_builtin_generation_is_deterministic_and_sharded(tmp_path: Path) -> None:
    spec = BUILTIN_DATASETS["teacher"]
    first = materialize(spec, 20000, str(tmp_path / "one"))
    second = materialize(spec, 20000, str(tmp_path / "two"))
    for split in ("train", "test"):
        assert read_split(first, split).equals(read_split(second, split))
    shards = sorted(Path(first, "train").glob("part-*.parquet"))
    assert [pq.ParquetFile(s).metadata.num_rows for s in shards] == [16384, 3616]
    groups = [pq.ParquetFile(shards[0]).metadata.row_group(i).num_rows for i in range(4)]
    assert groups == [4096] * 4
    schema = pq.read_schema(shards[0])
    assert schema.metadata[b"num_features"] == b"32"
    assert schema.metadata[b"num_classes"] == b"10"
    assert schema.field("x").type == pa.list_(pa.float32(), 32)
    assert read_split(first, "test").num_rows == 2000


def test_teacher_classes_are_roughly_balanced(tmp_path: Path) -> None:
    location = materialize(BUILTIN_DATASETS["teacher"], 20000, str(tmp_path))
    labels = read_split(location, "train").column("y").to_numpy()
    shares = np.bincount(labels, minlength=10) / len(labels)
    assert shares.min() > 0.07 and shares.max() < 0.13, shares


def test_digits_shapes(tmp_path: Path) -> None:
    info = resolve_dataset(data_config(tmp_path, dataset="digits"))
    assert (info.num_features, info.num_classes, info.name) == (64, 10, "digits-1797")
    train = BatchStream(info, "train", 100, seed=0)
    x, y = train.batch(0)
    assert x.shape == (100, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert train.batches_per_epoch == 1437 // 100
    test = list(BatchStream(info, "test", 100, seed=0))
    assert sum(len(y) for _, y in test) == 360
    assert sorted(set(torch.cat([y for _, y in test]).tolist())) == list(range(10))


def test_interrupted_generation_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch
) -> None:
    spec = BUILTIN_DATASETS["teacher"]

    def crashing(split: str, size: int):
        yield from spec.rows(split, size)
        raise RuntimeError("killed while writing")

    monkeypatch.setitem(BUILTIN_DATASETS, "teacher", dataclasses.replace(spec, rows=crashing))
    config = data_config(tmp_path, dataset="teacher", size=3000)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_dataset(config)
    assert not Path(config.root).exists() or not any(Path(config.root).iterdir())
    monkeypatch.setitem(BUILTIN_DATASETS, "teacher", spec)
    info = resolve_dataset(config)
    assert pq.read_table(info.train).num_rows == 3000


class _NoDirectoryRename:
    """A local filesystem that, like an object store, cannot rename a directory."""

    def __init__(self) -> None:
        self._fs = pafs.LocalFileSystem()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def move(self, src: str, dest: str) -> None:
        raise OSError("cannot rename a directory here")


def test_publish_copies_when_directories_cannot_be_renamed(tmp_path: Path, monkeypatch) -> None:
    local = files.resolve
    monkeypatch.setattr(files, "resolve", lambda where: (_NoDirectoryRename(), local(where)[1]))
    location = materialize(BUILTIN_DATASETS["teacher"], 3000, str(tmp_path))
    monkeypatch.undo()
    expected = materialize(BUILTIN_DATASETS["teacher"], 3000, str(tmp_path / "renamed"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert Path(location, "_COMPLETE").is_file()
    for split in ("train", "test"):
        assert read_split(location, split).equals(read_split(expected, split))


# Streams


def test_stream_shapes_and_dtypes(tmp_path: Path, user_dir: Path) -> None:
    info = user_info(tmp_path, user_dir)
    assert (info.num_features, info.num_classes, info.name) == (4, 4, "user")
    x, y = BatchStream(info, "train", 16, seed=3).batch(0)
    assert x.shape == (16, 4) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    ids = x[:, 0]
    assert torch.equal(x[:, 1:], torch.stack([ids, -ids, ids / 2], dim=1))
    assert torch.equal(y, ids.long() % 4)


def test_same_seed_same_batches_and_jumps_match(tmp_path: Path, user_dir: Path) -> None:
    info = user_info(tmp_path, user_dir)
    stream = BatchStream(info, "train", 24, seed=7, shuffle_window=2)
    sequential = [stream.batch(t) for t in range(3 * stream.batches_per_epoch + 2)]
    fresh = BatchStream(info, "train", 24, seed=7, shuffle_window=2)
    for t in (len(sequential) - 1, 0, 30, 5, 6, stream.batches_per_epoch):
        x, y = fresh.batch(t)
        assert torch.equal(x, sequential[t][0]) and torch.equal(y, sequential[t][1]), t
    other_seed = BatchStream(info, "train", 24, seed=8, shuffle_window=2)
    assert not torch.equal(other_seed.batch(0)[0], sequential[0][0])


def test_epochs_differ_and_each_covers_the_train_rows_once(tmp_path: Path, user_dir: Path) -> None:
    info = user_info(tmp_path, user_dir)
    stream = BatchStream(info, "train", 25, seed=1)
    per_epoch = stream.batches_per_epoch
    epochs = [ids_of([stream.batch(e * per_epoch + k) for k in range(per_epoch)]) for e in (0, 1)]
    train_ids = set(range(600)) - set(ids_of(list(BatchStream(info, "test", 25, seed=1))))
    for ids in epochs:
        assert len(ids) == len(set(ids)) == per_epoch * 25
        assert set(ids) <= train_ids and len(train_ids) - len(ids) < 25
    assert epochs[0] != epochs[1]


def test_each_epoch_permutes_row_groups_and_shuffles_within_them(
    tmp_path: Path, user_dir: Path
) -> None:
    write_rows(tmp_path / "held" / "t.parquet", np.arange(700, 710))
    info = user_info(tmp_path, user_dir, test_path=str(tmp_path / "held"))
    stream = BatchStream(info, "train", 10, seed=2, shuffle_window=1)
    assert stream.batches_per_epoch == 60
    orders = []
    for epoch in (0, 1):
        ids = ids_of([stream.batch(epoch * 60 + k) for k in range(60)])
        groups = [i // 50 for i in ids[::50]]
        assert [i // 50 for i in ids] == [g for g in groups for _ in range(50)]  # one at a time
        assert sorted(groups) == list(range(12)) and ids[:50] != sorted(ids[:50])
        orders.append(groups)
    assert orders[0] != orders[1]


def test_jump_skips_windows_without_reading_them(
    tmp_path: Path, user_dir: Path, monkeypatch
) -> None:
    info = user_info(tmp_path, user_dir, test_fraction=0.01)
    stream = BatchStream(info, "train", 10, seed=0, shuffle_window=2)
    read: list[int] = []
    original = ParquetRows._read
    monkeypatch.setattr(
        ParquetRows, "_read", lambda self, frags: read.append(len(frags)) or original(self, frags)
    )
    stream.batch(stream.batches_per_epoch - 1)
    assert read == [2]


def test_split_of_user_data_is_disjoint_and_complete(tmp_path: Path, user_dir: Path) -> None:
    info = user_info(tmp_path, user_dir, test_fraction=0.25)
    assert info.test is None
    train = BatchStream(info, "train", 1, seed=0)
    train_ids = ids_of([train.batch(t) for t in range(train.batches_per_epoch)])
    test_ids = ids_of(list(BatchStream(info, "test", 64, seed=0)))
    assert test_ids == sorted(test_ids)  # evaluation reads in stored order
    assert set(train_ids).isdisjoint(test_ids)
    assert sorted(train_ids + test_ids) == list(range(600))
    assert 0.15 < len(test_ids) / 600 < 0.35


def test_test_pass_keeps_last_partial_batch(tmp_path: Path, user_dir: Path) -> None:
    write_rows(tmp_path / "held" / "t.parquet", np.arange(700, 770), row_group_size=32)
    info = user_info(tmp_path, user_dir, test_path=str(tmp_path / "held"))
    sizes = [len(y) for _, y in BatchStream(info, "test", 32, seed=0)]
    assert sizes == [32, 32, 6]
    assert ids_of(list(BatchStream(info, "test", 32, seed=0))) == list(range(700, 770))
    train = BatchStream(info, "train", 600, seed=0)
    assert sorted(ids_of([train.batch(0)])) == list(range(600))


def test_scalar_feature_columns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "a": pa.array(np.linspace(0, 1, 64), pa.float64()),
            "b": pa.array(np.arange(64), pa.int32()),
            "cls": pa.array(np.arange(64) % 3, pa.uint8()),
        }
    )
    pq.write_table(table, tmp_path / "scalars.parquet", row_group_size=16)
    config = data_config(
        tmp_path, path=str(tmp_path / "scalars.parquet"), features=["b", "a"], label="cls"
    )
    info = resolve_dataset(config)
    assert (info.num_features, info.num_classes, info.name) == (2, 3, "scalars")
    x, y = BatchStream(info, "train", 8, seed=0).batch(0)
    assert x.shape == (8, 2)
    rows = x[:, 0].long()
    assert torch.allclose(x[:, 1], (rows.double() / 63).float())
    assert torch.equal(y, rows % 3)


def test_num_classes_from_config_is_kept_and_checked(tmp_path: Path, user_dir: Path) -> None:
    assert user_info(tmp_path, user_dir, num_classes=6).num_classes == 6
    info = user_info(tmp_path, user_dir, num_classes=2)
    with pytest.raises(ConfigError, match=r"data\.label:.*data\.num_classes"):
        BatchStream(info, "train", 8, seed=0).batch(0)


def test_batch_larger_than_train_split(tmp_path: Path, user_dir: Path) -> None:
    info = user_info(tmp_path, user_dir)
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        BatchStream(info, "train", 1000, seed=0)


# Config errors


def _write_problem_data(tmp_path: Path) -> None:
    """One file or directory per mistake the parametrized cases below refer to by name."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a,b\n")
    bad = {
        "ragged": pa.table({"x": pa.array([[1.0], [2.0, 3.0]]), "y": [0, 1]}),
        "strings": pa.table({"x": ["a", "b"], "y": [0, 1]}),
        "float_label": pa.table({"x": [1.0, 2.0], "y": [0.0, 1.0]}),
        "narrow": pa.table({"x": [1.0, 2.0], "y": [0, 1]}),
        "wide": pa.table(
            {"x": pa.array([[1.0, 2], [3, 4]], pa.list_(pa.float32(), 2)), "y": [0, 1]}
        ),
    }
    for name, table in bad.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
    (tmp_path / "mixed").mkdir()
    pq.write_table(bad["wide"], tmp_path / "mixed" / "a.parquet")
    pq.write_table(bad["narrow"], tmp_path / "mixed" / "b.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"path": "{tmp}/missing"}, r"data\.path: '.*missing' does not exist"),
        ({"path": "{tmp}/empty"}, r"data\.path: .* holds no \*\.parquet files"),
        ({"path": "{tmp}/garbage.parquet"}, r"data\.path: .* not a readable Parquet"),
        (
            {"path": "{tmp}/strings.parquet", "features": ["z"]},
            r"data\.features: .*'z'.*\['x', 'y'\]",
        ),
        ({"path": "{tmp}/ragged.parquet"}, r"data\.features: .*'x'.*fixed_size_list"),
        ({"path": "{tmp}/strings.parquet"}, r"data\.features: .*'x'.*string"),
        ({"path": "{tmp}/mixed"}, r"data\.features: .*disagree.*2 in .*a\.parquet.*1 in"),
        ({"path": "{tmp}/float_label.parquet"}, r"data\.label: .*'y'.*integer"),
        ({"path": "{tmp}/wide.parquet", "label": "cls"}, r"data\.label: .*'cls'.*\['x', 'y'\]"),
        (
            {"path": "{tmp}/wide.parquet", "test_path": "{tmp}/nowhere"},
            r"data\.test_path: '.*nowhere' does not exist",
        ),
        (
            {"path": "{tmp}/wide.parquet", "test_path": "{tmp}/narrow.parquet"},
            r"data\.test_path: .*1 features.*data\.path has 2",
        ),
        (
            {"dataset": "mnist"},
            r"data\.dataset: 'mnist'.*\['digits', 'digits-images', 'grammar', 'teacher'\]",
        ),
        ({"dataset": "digits", "size": 100}, r"data\.size: 100 .*'digits'"),
        ({"dataset": "teacher", "features": ["a"]}, r"data\.features: \['a'\].*'x'"),
        ({"dataset": "teacher", "label": "c"}, r"data\.label: 'c'.*'y'"),
        ({"dataset": "teacher", "num_classes": 3}, r"data\.num_classes: 3"),
        ({"dataset": "teacher", "path": "{tmp}/wide.parquet"}, r"data\.dataset / data\.path"),
        (
            {"dataset": "teacher", "size": 300, "batch_size": 301},
            r"data\.batch_size: 301 .*all 300 examples.*raise data\.size",
        ),
        ({"dataset": "digits", "batch_size": 5000}, r"data\.batch_size: 5000 .*'digits'; lower"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, fields: dict, expected: str) -> None:
    _write_problem_data(tmp_path)
    filled = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in fields.items()}
    config = data_config(tmp_path, **filled)
    with pytest.raises(ConfigError, match=expected):
        check_dataset(config)
    with pytest.raises(ConfigError, match=expected):
        resolve_dataset(config)
    assert not Path(config.root).exists()


def test_labels_must_start_at_zero_with_two_classes(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1.0, 2.0], "y": [-1, 1]}), tmp_path / "neg.parquet")
    config = data_config(tmp_path, path=str(tmp_path / "neg.parquet"))
    for check in (check_dataset, resolve_dataset):
        with pytest.raises(ConfigError, match=r"data\.label: .*from -1 to 1"):
            check(config)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("table", "fields", "expected"),
    [
        (
            {"x": [1.0, 2.0, 3.0], "y": [0, 1, 10**12]},
            {},
            r"data\.label: column 'y' holds labels from 0 to 1000000000000; .*2 <= K <= 1048576",
        ),
        (
            {"x": [1.0, 2.0, 3.0], "y": [0, 1, 5]},
            {"num_classes": 3},
            r"data\.label: .*from 0 to 5; .*0\.\.2 \(data\.num_classes is 3",
        ),
        ({"x": [1.0, 2.0, 3.0], "y": [0, None, 1]}, {}, r"data\.label: .*1 rows without a label"),
        (
            {"x": [1.0, NAN, INF], "y": [0, 1, 1]},
            {},
            r"data\.features: column 'x' has 2 rows with NaN, inf or missing values",
        ),
        (
            {"x": [1.0, None, -INF, 4.0], "y": [0, 1, 1, 0]},
            {},
            r"data\.features: column 'x' has 2 rows",
        ),
        (
            {
                "x": pa.array([[1.0, NAN], [2.0, 3.0], [INF, -INF]], pa.list_(pa.float32(), 2)),
                "y": [0, 1, 1],
            },
            {},
            r"data\.features: column 'x' has 2 rows",
        ),
    ],
)
def test_label_range_and_finite_features_are_checked_before_anything_starts(
    tmp_path: Path, table: dict, fields: dict, expected: str
) -> None:
    pq.write_table(pa.table(table), tmp_path / "bad.parquet")
    config = data_config(tmp_path, path=str(tmp_path / "bad.parquet"), **fields)
    with pytest.raises(ConfigError, match=expected):
        check_dataset(config)


def test_integer_features_and_a_held_out_file_are_scanned_too(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2], "y": [0, 1]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"x": [3, 4], "y": [0, 7]}), tmp_path / "test.parquet")
    config = data_config(tmp_path, path=str(tmp_path / "train.parquet"))
    check_dataset(config)  # integers are always finite
    held_out = data_config(
        tmp_path,
        path=str(tmp_path / "train.parquet"),
        test_path=str(tmp_path / "test.parquet"),
        num_classes=2,
    )
    with pytest.raises(ConfigError, match=r"data\.label: .*from 0 to 7"):
        check_dataset(held_out)


def test_the_class_count_of_the_check_is_passed_on_so_labels_are_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.data import footers

    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "y": [0, 4, 1]}), tmp_path / "t.parquet")
    config = data_config(tmp_path, path=str(tmp_path / "t.parquet"))
    counted = check_dataset(config)
    assert counted == 5

    def second_scan(*_args):
        raise AssertionError("the label column was read a second time")

    monkeypatch.setattr(footers, "check_values", second_scan)
    assert resolve_dataset(config, counted).num_classes == 5


def test_a_store_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    config = data_config(tmp_path, path="nosuchscheme://bucket/data")
    with pytest.raises(ConfigError, match=r"data\.path: 'nosuchscheme://bucket/data' cannot be"):
        check_dataset(config)
