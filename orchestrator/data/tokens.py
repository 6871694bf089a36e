"""Text as token ids for language models, tokenised once per (text, tokenizer) into a file.

The cache lives under the data root (``data.root/tokens/``), not next to the text: the text
may sit in a read-only place or in an object store the run cannot write, while the data root
is where the project already writes generated data, shared by every run that uses it. The
file is raw little-endian token ids (uint8, uint16 or uint32, the narrowest that holds the
vocabulary), so a worker maps it into memory and reads any window without parsing.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from orchestrator.data import files
from orchestrator.errors import ConfigError

BYTES = "bytes"
_FORMAT_VERSION = 1
_CHUNK_BYTES = 1 << 22  # text tokenised a few MB at a time, cut at line ends
Encoder = Callable[[list[str]], list[np.ndarray]]


@dataclass(frozen=True)
class TokenFormat:
    """How a data set's token files are laid out; travels inside ``DatasetInfo``."""

    dtype: str  # numpy dtype of the ids in the files
    vocab_size: int
    context: int  # T: a window is T + 1 tokens, x its first T, y its last T
    tokenizer: str  # "bytes" or the tokenizer.json it came from


@dataclass(frozen=True)
class Tokenizer:
    name: str  # "bytes" or the absolute path of its tokenizer.json
    vocab_size: int
    fingerprint: str  # changes whenever the ids a text maps to can change
    encode: Encoder  # pieces of text -> their ids, in order

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(token_dtype(self.vocab_size))


def token_dtype(vocab_size: int) -> str:
    return "uint8" if vocab_size <= 1 << 8 else "uint16" if vocab_size <= 1 << 16 else "uint32"


def load_tokenizer(spec: str) -> Tokenizer:
    """``bytes`` (UTF-8 bytes, vocabulary 256) or a ``tokenizers`` tokenizer.json file."""
    if spec == BYTES:
        return Tokenizer(BYTES, 256, BYTES, _utf8_bytes)
    from tokenizers import Tokenizer as HFTokenizer

    location = files.absolute(spec)
    fs, path = files.resolve(location)
    try:
        with fs.open_input_stream(path) as handle:
            blob = handle.read()
        tokenizer = HFTokenizer.from_str(blob.decode("utf-8"))
    except Exception as err:  # tokenizers reports a bad file as a plain Exception
        raise ConfigError(
            f"data.text.tokenizer: {spec!r} is not a readable tokenizer.json of the `tokenizers` "
            f"library ({err}); give one, or use 'bytes'"
        ) from None

    def encode(texts: list[str]) -> list[np.ndarray]:
        batch = tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in batch]

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    return Tokenizer(location, vocab, hashlib.sha256(blob).hexdigest(), encode)


def _utf8_bytes(texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(text.encode("utf-8"), np.uint8) for text in texts]


def cached_tokens(
    field: str, source: str, column: str | None, tokenizer: Tokenizer, root: str, name: str
) -> tuple[str, int]:
    """The token file of ``source`` (a .txt file, or the text ``column`` of Parquet data) and
    its length in tokens, written on first use as ``root/tokens/<name>-<key>.<dtype>``. The
    key hashes every source file's identity (location, size, modification time), the column
    and the tokenizer, so changing any of them makes a new file instead of reading a stale
    one."""
    location = files.absolute(source)
    fs, path = files.resolve(location)
    try:
        paths = [path] if column is None else files.parquet_files(fs, path)
    except FileNotFoundError:
        paths = []
    found = [info for info in fs.get_file_info(paths) if info.type == pafs.FileType.File]
    if not found:
        raise ConfigError(
            f"{field}: {source!r} does not exist or holds no Parquet files; give a UTF-8 .txt "
            "file or Parquet data with a text column"
        )
    identity = [_FORMAT_VERSION, column, tokenizer.fingerprint]
    identity += [[info.path, info.size, info.mtime_ns] for info in found]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
    target = files.join(files.absolute(root), "tokens", f"{name}-{key}.{tokenizer.dtype.name}")
    out_fs, out_path = files.resolve(target)
    if not files.exists(out_fs, out_path):
        pieces = _texts(field, fs, [info.path for info in found], column)
        _write_atomically(out_fs, out_path, _token_pieces(pieces, tokenizer))
    return target, out_fs.get_file_info(out_path).size // tokenizer.dtype.itemsize


def _token_pieces(texts: Iterator[list[str]], tokenizer: Tokenizer) -> Iterator[bytes]:
    for batch in texts:
        for ids in tokenizer.encode(batch):
            yield ids.astype(tokenizer.dtype.newbyteorder("<"), copy=False).tobytes()


def _write_atomically(fs: pafs.FileSystem, path: str, pieces: Iterator[bytes]) -> None:
    """Write beside the target and move into place, so a crash leaves no partial token file
    that a later run would take for a finished one."""
    fs.create_dir(path.rsplit("/", 1)[0])
    staging = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(staging) as sink:
            for piece in pieces:
                sink.write(piece)
        fs.move(staging, path)
    finally:
        if files.exists(fs, staging):
            fs.delete_file(staging)


def _texts(
    field: str, fs: pafs.FileSystem, paths: list[str], column: str | None
) -> Iterator[list[str]]:
    """The text in order as batches of pieces: lines of a text file, or one piece per row of
    a Parquet column with a newline after each document."""
    if column is None:
        yield from _text_file_lines(field, fs, paths[0])
        return
    dataset = ds.dataset(paths, format="parquet", filesystem=fs)
    for batch in dataset.to_batches(columns=[column], use_threads=False):
        values = batch.column(0)
        if values.null_count:
            raise ConfigError(f"{field}: column {column!r} has missing texts; drop those rows")
        yield [text + "\n" for text in values.to_pylist()]


def _text_file_lines(field: str, fs: pafs.FileSystem, path: str) -> Iterator[list[str]]:
    tail = b""
    with fs.open_input_stream(path) as handle:
        while True:
            block = handle.read(_CHUNK_BYTES)
            data = tail + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            whole, tail = data[:cut], data[cut:]
            if whole:
                try:
                    yield whole.decode("utf-8").splitlines(keepends=True)
                except UnicodeDecodeError as err:
                    raise ConfigError(f"{field}: {path!r} is not UTF-8 text ({err})") from None
            if not block:
                return
