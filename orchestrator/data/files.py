"""Storage access through ``pyarrow.fs``, so local disks and object stores share one code path."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from orchestrator.errors import ConfigError


def is_uri(location: str) -> bool:
    return "://" in location


def is_text_file(location: str | None) -> bool:
    """Whether data lives in a plain UTF-8 text file, which is read as one token stream."""
    return location is not None and location.lower().endswith(".txt")


def absolute(location: str) -> str:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    if is_uri(location):
        return location.rstrip("/")
    return os.path.abspath(os.path.expanduser(location))


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), absolute(location)


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """The Parquet files at ``path`` in a fixed order, which defines each row's global position.

    A file is taken as given; a directory is searched recursively for ``*.parquet``, skipping
    hidden and ``_``-prefixed entries as Spark and pyarrow writers use those for bookkeeping.
    Raises FileNotFoundError when nothing is at ``path``.
    """
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type == pafs.FileType.File:
        return [path]
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        relative = entry.path[len(path.rstrip("/")) + 1 :].split("/")
        visible = not any(part.startswith((".", "_")) for part in relative)
        if entry.type == pafs.FileType.File and visible and entry.path.endswith(".parquet"):
            found.append(entry.path)
    return sorted(found)


def unopenable(field: str, location: str, err: Exception) -> ConfigError:
    """A store that cannot be opened (an unknown scheme, an unreachable bucket)."""
    return ConfigError(
        f"{field}: {location!r} cannot be opened ({err}); check the URI, the network and "
        "the store's credentials"
    )
