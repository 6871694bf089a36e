"""Token streams: tokenising once into a cache, fixed windows, deterministic order and splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from orchestrator.config import DataConfig
from orchestrator.data import check_dataset, resolve_dataset
from orchestrator.data.corpus import generated_corpus
from orchestrator.data.spec import InputSpec
from orchestrator.data.stream import BatchStream
from orchestrator.errors import ConfigError

TEXT = generated_corpus(6000) + "\nUnicode too: café, naïve, 東京.\n"


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def text_config(tmp_path: Path, path: Path, **text: object) -> DataConfig:
    return DataConfig(
        path=str(path), text={"context": 16, **text}, root=str(tmp_path / "root"), batch_size=8
    )


def windows(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for x, _ in batches for row in x]


def test_byte_windows_predict_the_next_byte_at_every_position(tmp_path, text_file) -> None:
    info = resolve_dataset(text_config(tmp_path, text_file))
    assert info.input == InputSpec("tokens", (16,), 256)
    encoded = TEXT.encode("utf-8")
    aligned = {encoded[start : start + 17] for start in range(0, len(encoded) - 16, 16)}
    stream = BatchStream(info, "train", 8, seed=0)
    for t in range(3):
        x, y = stream.batch(t)
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        for xs, ys in zip(x, y, strict=True):
            assert bytes(xs.tolist() + [int(ys[-1])]) in aligned


def test_train_and_held_out_windows_split_the_text(tmp_path, text_file) -> None:
    info = resolve_dataset(text_config(tmp_path, text_file))
    total = (len(TEXT.encode("utf-8")) - 1) // 16
    train = windows(list(BatchStream(info, "train", 8, seed=0)))
    test = windows(list(BatchStream(info, "test", 8, seed=0)))
    assert len(train) + len(test) == total and 0.05 < len(test) / total < 0.15
    assert not set(train) & set(test)
    per_epoch = BatchStream(info, "train", 8, seed=0).batches_per_epoch
    assert per_epoch == len(train) // 8


def test_a_resumed_stream_sees_the_same_batches_and_epochs_reshuffle(tmp_path, text_file) -> None:
    info = resolve_dataset(text_config(tmp_path, text_file))
    stream = BatchStream(info, "train", 8, seed=4)
    per_epoch = stream.batches_per_epoch
    sequential = [stream.batch(t) for t in range(2 * per_epoch + 1)]
    for t in (0, 5, per_epoch - 1, per_epoch, 2 * per_epoch):
        x, y = BatchStream(info, "train", 8, seed=4).batch(t)
        assert torch.equal(x, sequential[t][0]) and torch.equal(y, sequential[t][1])
    every = Counter(windows(list(BatchStream(info, "train", 8, seed=0))))
    first, second = sequential[:per_epoch], sequential[per_epoch : 2 * per_epoch]
    for epoch in (first, second):  # each window at most once per epoch
        assert len(windows(epoch)) == 8 * per_epoch and not Counter(windows(epoch)) - every
    assert windows(first) != windows(second)
    other_seed = BatchStream(info, "train", 8, seed=5)
    assert not torch.equal(other_seed.batch(0)[0], sequential[0][0])


def test_tokenising_happens_once_into_the_data_root(tmp_path, text_file) -> None:
    config = text_config(tmp_path, text_file)
    info = resolve_dataset(config)
    cached = sorted((tmp_path / "root" / "tokens").iterdir())
    assert [path.name for path in cached] == [Path(info.train).name]
    stamp = cached[0].stat().st_mtime_ns
    assert resolve_dataset(config) == info and cached[0].stat().st_mtime_ns == stamp
    text_file.write_text(TEXT + "more text\n", encoding="utf-8")
    assert resolve_dataset(config).train != info.train


def trained_tokenizer(path: Path) -> Path:
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer)
    target = path / "tokenizer.json"
    tokenizer.save(str(target))
    return target


def test_a_tokenizers_file_cuts_its_ids_into_windows(tmp_path, text_file) -> None:
    tokenizer_path = trained_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    ids = [
        i
        for line in TEXT.splitlines(keepends=True)
        for i in tokenizer.encode(line, add_special_tokens=False).ids
    ]
    config = DataConfig(
        path=str(text_file),
        test_path=str(text_file),
        text={"context": 16, "tokenizer": str(tokenizer_path)},
        root=str(tmp_path / "root"),
    )
    info = resolve_dataset(config)
    assert info.input == InputSpec("tokens", (16,), tokenizer.get_vocab_size())
    assert info.tokens.dtype == "uint16"
    pieces = list(BatchStream(info, "test", 8, seed=0))  # every window in stored order
    stream = [int(row[0]) for x, _ in pieces for row in x]
    assert stream == ids[: len(stream) * 16 : 16]
    x, y = pieces[0]
    assert torch.equal(x.reshape(-1), torch.tensor(ids[: x.numel()]))
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_a_parquet_text_column_reads_like_a_text_file_of_its_lines(tmp_path, text_file) -> None:
    lines = TEXT.splitlines()
    pq.write_table(pa.table({"body": lines}), tmp_path / "docs.parquet", row_group_size=7)
    from_file = resolve_dataset(text_config(tmp_path, text_file))
    from_column = resolve_dataset(text_config(tmp_path, tmp_path / "docs.parquet", column="body"))
    a = np.fromfile(from_file.train, np.uint8)
    b = np.fromfile(from_column.train, np.uint8)
    assert bytes(b) == ("\n".join(lines) + "\n").encode("utf-8") and bytes(a) == TEXT.encode(
        "utf-8"
    )


def test_the_built_in_grammar_text(dataset_root: Path) -> None:
    info = resolve_dataset(DataConfig(dataset="grammar", size=30_000, root=str(dataset_root)))
    assert info.input == InputSpec("tokens", (128,), 256) and info.name == "grammar-30000"
    x, y = BatchStream(info, "train", 4, seed=0).batch(0)
    assert x.shape == (4, 128) and torch.equal(y[:, :-1], x[:, 1:])
    held_out = list(BatchStream(info, "test", 32, seed=0))
    assert sum(len(x) for x, _ in held_out) == (20_000 - 1) // 128
    text = bytes(held_out[0][0][0].tolist()).decode("ascii")
    assert text == generated_corpus(50_000)[30_000 : 30_000 + 128]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"text": {"context": 100_000}}, r"data\.text\.context: a window of 100000 \+ 1 tokens"),
        ({"text": {"tokenizer": "{tmp}/none.json"}}, r"data\.text\.tokenizer: .*none\.json"),
        ({"path": "{tmp}/nothing.txt"}, r"data\.path: .*nothing\.txt' does not exist"),
        (
            {"path": "{tmp}/docs.parquet", "text": {}},
            r"data\.text\.column: column 'text' is not in",
        ),
        (
            {"path": "{tmp}/docs.parquet", "text": {"column": "n"}},
            r"data\.text\.column: .*'n'.*strings",
        ),
    ],
)
def test_text_misconfigurations_name_the_field(tmp_path, text_file, fields, expected) -> None:
    pq.write_table(pa.table({"body": ["a b"], "n": [1]}), tmp_path / "docs.parquet")
    filled = {"path": str(text_file), "root": str(tmp_path / "root"), **fields}
    filled = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in filled.items()}
    if "tokenizer" in filled.get("text", {}):
        filled["text"] = {"tokenizer": filled["text"]["tokenizer"].format(tmp=tmp_path)}
    config = DataConfig(**filled)
    if "context" not in fields.get("text", {}):
        with pytest.raises(ConfigError, match=expected):
            check_dataset(config)
    with pytest.raises(ConfigError, match=expected):
        resolve_dataset(config)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"path": "a.txt", "text": {"column": "body"}}, r"is a text file, which has no columns"),
        ({"path": "a.txt", "label": "c"}, r"data\.label / data\.num_classes"),
        ({"path": "d.parquet", "text": {}, "num_classes": 5}, r"data\.label / data\.num_classes"),
        ({"path": "a.txt", "features": ["a"]}, r"data\.features applies to tables only"),
        ({"dataset": "grammar", "text": {"context": 0}}, r"greater than 0"),
    ],
)
def test_bad_text_sections_are_refused_at_load(fields: dict, expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        DataConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"dataset": "teacher", "text": {}}, r"data\.text: the built-in 'teacher' holds table"),
        ({"dataset": "grammar", "text": {"column": "t"}}, r"data\.text\.column: .*'grammar'"),
        ({"dataset": "grammar", "image": {}}, r"data\.image: the built-in 'grammar' holds tokens"),
    ],
)
def test_built_in_text_misconfigurations(tmp_path: Path, fields: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        check_dataset(DataConfig(root=str(tmp_path), **fields))
    assert not tmp_path.joinpath("tokens").exists()


def test_a_text_too_short_to_hold_out_a_window_is_refused(tmp_path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 8)  # 80 bytes: 4 windows of 16
    with pytest.raises(ConfigError, match="data.test_fraction: .* none held out; add text"):
        resolve_dataset(text_config(tmp_path, short, context=16))
