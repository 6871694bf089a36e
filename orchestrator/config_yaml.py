"""Reading YAML a user wrote (a config file, a ``--set`` value, a schedule) into plain data.

``yaml.safe_load`` alone accepts duplicate keys (the second silently wins), expands a
"billion laughs" of nested aliases into a structure whose first copy or print takes
gigabytes, and raises exceptions whose text does not say what to fix. Every failure here
is a ``ConfigError`` (or the caller's ``UserError`` class) naming the source, the line and
column, and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from orchestrator.errors import ConfigError, UserError

MAX_NODES = 100_000
"""Values a document may hold once its aliases are expanded. The largest example config
holds about 100; a data set belongs in a file that ``data.path`` names, not in the YAML."""

MAX_BYTES = 10 * 2**20
"""A config, schedule or ``--set`` value larger than this is not a config."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # a merged mapping's keys may be overridden: that is what << is for
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key]}, again on line {line}); "
                    "keep one of them",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def expanded_size(root: Node, limit: int = MAX_NODES) -> int:
    """Values ``root`` holds with every alias expanded, counted without expanding them
    (each node's size once, memoised); a recursive alias counts as over ``limit``."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            return limit + 1  # an alias to a node that contains it: infinite when expanded
        open_nodes.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        sizes[key] = total = min(total, limit + 1)
        return total

    return size(root)


def read_yaml_file(file: Path, what: str, error: type[UserError] = ConfigError) -> Any:
    """The plain data of a YAML file the user named (``what``: how the message names it),
    or ``error`` saying it is missing, unreadable or too large to be one."""
    if not file.is_file():
        raise error(f"{what} {str(file)!r} does not exist (no such file)")
    try:
        if file.stat().st_size > MAX_BYTES:
            raise error(f"{what} {str(file)!r}: over 10 MiB, so not a config; check the path")
        data = file.read_bytes()
    except OSError as err:
        raise error(f"{what} {str(file)!r} cannot be read: {err.strerror}") from None
    return parse_yaml(data, str(file), error)


def parse_yaml(text: str | bytes, source: str, error: type[UserError] = ConfigError) -> Any:
    """The plain data (dicts, lists, str, int, float, bool, None) of one YAML document."""
    if isinstance(text, bytes):
        text = decode_text(text, source, error)
    if len(text) > MAX_BYTES:
        raise error(f"{source}: {len(text)} characters; a config is at most {MAX_BYTES} (10 MiB)")
    try:
        return _load(text, source, error)
    except yaml.YAMLError as err:
        raise error(f"{source}: {describe_yaml_error(err)}") from None
    except RecursionError:
        raise error(f"{source}: nested too deeply to read; flatten it") from None


def _load(text: str, source: str, error: type[UserError]) -> Any:
    loader = StrictLoader(text)  # refuses control characters: a YAMLError
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        if expanded_size(root) > MAX_NODES:
            raise error(
                f"{source}: its aliases (*name) expand to more than {MAX_NODES} values (or "
                "refer to themselves); write the values out, or use fewer nested aliases"
            )
        return loader.construct_document(root)
    finally:
        loader.dispose()


def decode_text(data: bytes, source: str, error: type[UserError] = ConfigError) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(
            f"{source}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "a config is a YAML text file: check the path, or save it as UTF-8"
        ) from None


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """Where YAML failed (1-based line and column) and what to change."""
    if isinstance(err, yaml.reader.ReaderError):
        return (
            f"character #x{err.character:04x} at offset {err.position} is not allowed in YAML; "
            "remove it (control characters cannot be written in a config)"
        )
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    if isinstance(err, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
        return (
            f"{where}{problem}; tags such as !!python/... are not allowed: a config holds "
            "plain values (numbers, strings, lists, mappings)"
        )
    if isinstance(err, yaml.constructor.ConstructorError):
        return f"{where}{problem}"
    detail = f"{context}, {problem}" if context else problem
    return (
        f"not valid YAML at {where}{detail}; check the indentation there, and quote a value "
        "that holds ': ', ' #', or starts with a special character (* & ! | > % @ `)"
    )
