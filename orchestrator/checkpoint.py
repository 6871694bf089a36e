"""Checkpoints on any filesystem pyarrow can reach: a local disk, S3, GCS or HDFS.

A run must be able to resume after its process, node or whole cluster died mid-write, so
a checkpoint is trusted only once its manifest exists, and the manifest is the last thing
written. The manifest also carries a checksum of every file, because object stores and
network disks can hand back truncated or damaged data without raising.

A damaged checkpoint (a file truncated, changed or unreadable) is reported and passed
over for the newest intact one (``load_newest_intact``): a run that recovers or resumes
loses the steps since that one instead of ending.

Values are serialised with ``torch.save`` and read back with ``weights_only=True``: a
checkpoint may come from a shared bucket, and loading one must never run code from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from pyarrow import fs as pafs

from orchestrator.errors import UserError

log = logging.getLogger("unlocked")

FORMAT_VERSION: int = 1

_MANIFEST = "manifest.json"
# Written first and renamed, so a reader never sees half a manifest on a local disk.
_MANIFEST_TMP = "manifest.json.tmp"
_STEP_NAME = re.compile(r"step-(\d+)")
# Keys become file names, so they are held to characters every store accepts.
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class CheckpointError(UserError):
    """A checkpoint cannot be trusted; the message names it and how to fall back.

    ``directory`` is the checkpoint's folder and ``cause`` what is wrong with it, for the
    one line that reports a damaged checkpoint being passed over."""

    def __init__(self, message: str, directory: str = "", cause: str = "") -> None:
        super().__init__(message)
        self.directory = directory
        self.cause = cause or message


class CheckpointWriteError(UserError):
    """The storage refused a checkpoint (full, read-only, unreachable). The run stops
    rather than training on without checkpoints, which would widen what the next crash
    loses; its newest complete checkpoint is untouched, so ``--resume`` continues it once
    the storage takes writes again."""

    resumable = True
    """``--resume`` continues from the newest complete checkpoint (as ``RunFailed``)."""

    def __init__(self, step: int, directory: str, err: OSError) -> None:
        reason = err.strerror or str(err) or type(err).__name__
        super().__init__(
            f"checkpoint storage: checkpoint step {step} cannot be written to {directory} "
            f"({reason}); the newest complete checkpoint is kept. Free space on that storage "
            "or make it writable, then continue the run with --resume"
        )
        self.step = step
        self.directory = directory


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a complete checkpoint lives, so it can be loaded without listing again."""

    step: int
    path: str
    meta: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one run, under a single directory or bucket prefix."""

    def __init__(self, uri: str, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (got {keep}): pruning would delete all")
        self._uri = uri
        self._keep = keep
        self._fs, self._root = _open_filesystem(uri)
        if isinstance(self._fs, pafs.LocalFileSystem):
            # Object stores have no real directories; on a disk, fail early on a bad path,
            # but create nothing: a run that fails before its first checkpoint leaves no
            # empty folder behind (save creates it).
            _check_creatable(self._root)

    @property
    def uri(self) -> str:
        """The location exactly as given, so logs show what the user configured."""
        return self._uri

    def save(
        self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None
    ) -> CheckpointInfo:
        """Write ``state`` as checkpoint ``step``, then prune old ones.

        Each top-level key gets its own file so a reader can tell which part is damaged.
        """
        if step < 0:
            raise ValueError(f"step must be non-negative (got {step})")
        for key in state:
            _check_key(key)
        meta_dict = dict(meta or {})
        # Fail on unserialisable metadata before anything is written, not after the data.
        json.dumps(meta_dict)

        directory = self._step_dir(step)
        try:
            self._write_checkpoint(directory, step, state, meta_dict)
        except OSError as err:
            self._discard(directory)
            raise CheckpointWriteError(step, directory, err) from err
        try:
            self._prune(step)
        except OSError as err:  # the checkpoint is complete: a stale one left is no loss
            log.warning("old checkpoints under %s could not be removed: %s", self._root, err)
        return CheckpointInfo(step=step, path=directory, meta=meta_dict)

    def _write_checkpoint(
        self, directory: str, step: int, state: Mapping[str, Any], meta: dict[str, Any]
    ) -> None:
        if self._fs.get_file_info(directory).type != pafs.FileType.NotFound:
            # Leftovers from a crashed attempt must not mix with the new files.
            self._fs.delete_dir(directory)
        self._fs.create_dir(directory, recursive=True)
        files = {
            f"{key}.pt": self._write(f"{directory}/{key}.pt", _serialise(value))
            for key, value in state.items()
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "created": datetime.now(timezone.utc).isoformat(),
            "meta": meta,
            "files": files,
        }
        self._write_manifest(directory, json.dumps(manifest, indent=2).encode())

    def _discard(self, directory: str) -> None:
        """Remove what a failed save wrote: on a full disk its half-written files hold the
        space a later save needs. Readers ignore it anyway (it has no manifest)."""
        # Read-only or gone: nothing was written there, or it cannot go.
        with contextlib.suppress(OSError):
            self._fs.delete_dir(directory)

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first; a directory without a manifest is ignored."""
        return [self._info(step) for step in self._complete_steps()]

    def steps(self) -> list[int]:
        """The steps of complete checkpoints, oldest first, without reading a manifest."""
        return self._complete_steps()

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint to resume from; reads only its own manifest."""
        steps = self._complete_steps()
        return self._info(steps[-1]) if steps else None

    def load_newest_intact(self) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """The newest checkpoint whose every file matches its manifest, loaded; each newer
        one that does not is logged (its folder and what is wrong) and passed over, and left
        in place: the run overwrites it when it reaches that step again. None: no
        complete checkpoint is intact."""
        for step in reversed(self._complete_steps()):
            try:
                info = self._info(step)
                return info, self.load(info)
            except CheckpointError as err:
                log.warning("checkpoint %s is damaged and skipped: %s", err.directory, err.cause)
        return None

    def load(self, checkpoint: CheckpointInfo | int) -> dict[str, Any]:
        """Read a checkpoint back, refusing it unless every file matches its manifest."""
        step = checkpoint.step if isinstance(checkpoint, CheckpointInfo) else checkpoint
        directory = self._step_dir(step)
        manifest = self._read_manifest(directory)
        return {
            name.removesuffix(".pt"): self._load_file(directory, name, expected)
            for name, expected in manifest["files"].items()
        }

    def _step_dir(self, step: int) -> str:
        return f"{self._root}/{_step_name(step)}"

    def _info(self, step: int) -> CheckpointInfo:
        directory = self._step_dir(step)
        return CheckpointInfo(step, directory, self._read_manifest(directory)["meta"])

    def _complete_steps(self) -> list[int]:
        return sorted(step for step, complete in self._scan().items() if complete)

    def _write(self, path: str, data: bytes) -> dict[str, Any]:
        with self._fs.open_output_stream(path) as out:
            out.write(data)
        return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def _write_manifest(self, directory: str, data: bytes) -> None:
        final = f"{directory}/{_MANIFEST}"
        if not isinstance(self._fs, pafs.LocalFileSystem):
            # A single put to an object store is atomic: readers see all of it or nothing.
            self._write(final, data)
            return
        temporary = f"{directory}/{_MANIFEST_TMP}"
        self._write(temporary, data)
        self._fs.move(temporary, final)

    def _scan(self) -> dict[int, bool]:
        """Map each step directory under the root to whether its manifest exists.

        Uses one listing and one batched stat, so it stays cheap on object stores.
        """
        selector = pafs.FileSelector(self._root, allow_not_found=True)
        steps = [
            step
            for entry in self._fs.get_file_info(selector)
            if entry.type == pafs.FileType.Directory
            and (step := _parse_step_name(entry.base_name)) is not None
        ]
        manifests = self._fs.get_file_info([f"{self._step_dir(s)}/{_MANIFEST}" for s in steps])
        return {
            step: info.type == pafs.FileType.File
            for step, info in zip(steps, manifests, strict=True)
        }

    def _prune(self, saved: int) -> None:
        steps = self._scan()
        complete = sorted(step for step, ok in steps.items() if ok)
        if not complete:
            return
        # An incomplete directory newer than every complete one may still be being written.
        stale_incomplete = [step for step, ok in steps.items() if not ok and step < complete[-1]]
        # A checkpoint newer than the one just saved is one the run went back past because
        # it was damaged: counting it would delete the intact ones a later fall-back needs.
        # The run overwrites it when it reaches that step again.
        kept_from = [step for step in complete if step <= saved]
        for step in kept_from[: -self._keep] + stale_incomplete:
            self._fs.delete_dir(self._step_dir(step))

    def _read_manifest(self, directory: str) -> dict[str, Any]:
        path = f"{directory}/{_MANIFEST}"
        try:
            manifest = json.loads(self._read(path))
        except FileNotFoundError as err:
            raise CheckpointError(
                f"{path} does not exist: the checkpoint in {directory} is missing or was "
                "never completed; load one that list() or latest() reports instead",
                directory,
                f"{path} does not exist",
            ) from err
        except OSError as err:
            raise _unreadable(path, err) from err
        except ValueError as err:
            raise _corrupt(directory, path, f"is not valid JSON ({err})") from err
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise _corrupt(
                directory,
                path,
                f"has format_version {version!r}, but this version of unlocked reads only "
                f"{FORMAT_VERSION}",
            )
        return manifest

    def _load_file(self, directory: str, name: str, expected: Mapping[str, Any]) -> Any:
        path = f"{directory}/{name}"
        try:
            data = self._read(path)
        except FileNotFoundError as err:
            raise _corrupt(directory, path, "is listed in the manifest but missing") from err
        except OSError as err:
            raise _unreadable(path, err) from err
        if len(data) != expected["bytes"]:
            raise _corrupt(directory, path, f"has {len(data)} bytes, expected {expected['bytes']}")
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise _corrupt(directory, path, "does not match its sha256 checksum")
        try:
            return torch.load(io.BytesIO(data), weights_only=True)
        # torch reports a refused object as UnpicklingError and a broken archive as
        # RuntimeError, among others; whichever it is, this file cannot be used.
        except Exception as err:
            raise _corrupt(directory, path, f"cannot be loaded safely ({err})") from err

    def _read(self, path: str) -> bytes:
        with self._fs.open_input_stream(path) as stream:
            return stream.readall()


def _open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    # from_uri rejects relative paths, which are the natural way to name a local folder.
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return filesystem, path.rstrip("/")


def _check_creatable(root: str) -> None:
    """Raise unless ``root`` is a folder, or one save() can create: its nearest existing
    ancestor must be a folder this process may write into."""
    path = root
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint folder {root}: {path} is a file, not a folder; set checkpoint.root "
            "to a folder (or a path that does not exist yet)"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"checkpoint folder {root}: {path} is not writable by this user; set "
            "checkpoint.root to a folder you may write to"
        )


def _step_name(step: int) -> str:
    return f"step-{step:09d}"


def _parse_step_name(name: str) -> int | None:
    # Only the exact name save() would write counts, so "step-1" can never shadow step 1.
    match = _STEP_NAME.fullmatch(name)
    if match is None or _step_name(int(match[1])) != name:
        return None
    return int(match[1])


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(
            f"state key {key!r} cannot be a file name: use letters, digits, '_', '.' and '-', "
            "not starting with '.' or '-'"
        )


def _serialise(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _unreadable(path: str, err: OSError) -> UserError:
    """A read that failed is the storage's trouble (a timeout, throttling, permissions),
    not proof of damage: passing over every checkpoint for it would restart the run from
    step 0, so it stops the run instead, naming the storage."""
    return UserError(
        f"checkpoint storage: {path} cannot be read ({err}); check the storage (network, "
        "credentials, permissions), then continue the run with --resume"
    )


def _corrupt(directory: str, path: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path} {problem}. The checkpoint in {directory} is unusable; recovery and "
        "--resume pass over it to the newest intact one",
        directory,
        f"{path} {problem}",
    )
