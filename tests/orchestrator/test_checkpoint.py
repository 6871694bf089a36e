"""Checkpoints survive crashes, reject damage, and never run code while loading."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    CheckpointWriteError,
)
from orchestrator.errors import UserError

EXECUTED: list[str] = []


def _record(tag: str) -> str:
    EXECUTED.append(tag)
    return tag


class Payload:
    """Unpickling this would call _record: a stand-in for a malicious checkpoint."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _record, ("payload ran",)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:09d}"


def sample_state() -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=generator)
    weight[0, 0] = math.nan
    return {
        "model": {
            "layers": [{"weight": weight, "bias": torch.zeros(3)}, {"scale": torch.ones(2)}],
            "steps": torch.arange(5, dtype=torch.int64),
            "half": torch.randn(6, generator=generator).to(torch.bfloat16),
        },
        "optimizer": {"lr": 0.125, "betas": [0.9, 0.999], "name": "adam", "fused": False},
        "extra": {"epoch": 7, "note": None, "done": True},
    }


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_shape = a.dtype == b.dtype and a.shape == b.shape
    return same_shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    state = sample_state()
    meta = {"mlflow_run_id": "abc123", "config_hash": "f00d", "nested": {"k": [1, 2]}}

    info = store.save(10, state, meta=meta)
    loaded = store.load(info)

    assert info == CheckpointInfo(10, str(step_dir(tmp_path / "ckpt", 10)), meta)
    assert set(loaded) == {"model", "optimizer", "extra"}
    original, restored = state["model"], loaded["model"]
    for key in ("steps", "half"):
        assert bit_identical(original[key], restored[key])
    for layer_in, layer_out in zip(original["layers"], restored["layers"], strict=True):
        assert layer_in.keys() == layer_out.keys()
        for key in layer_in:
            assert bit_identical(layer_in[key], layer_out[key])
    assert loaded["optimizer"] == state["optimizer"]
    assert loaded["extra"] == state["extra"]
    assert store.load(10).keys() == loaded.keys()
    assert store.latest() == info


def test_manifest_records_every_file(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save(3, {"a": torch.ones(2), "b": [1, 2]}, meta={"run": "x"})

    manifest = json.loads((step_dir(tmp_path, 3) / "manifest.json").read_text())

    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["step"] == 3
    assert manifest["meta"] == {"run": "x"}
    assert "T" in manifest["created"]
    assert set(manifest["files"]) == {"a.pt", "b.pt"}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (step_dir(tmp_path, 3) / name).stat().st_size
        assert len(entry["sha256"]) == 64
    assert not (step_dir(tmp_path, 3) / "manifest.json.tmp").exists()


def test_latest_is_highest_complete_step(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=5)
    store.save(2, {"x": torch.tensor(2)})
    store.save(1, {"x": torch.tensor(1)})
    crashed = step_dir(tmp_path, 5)
    crashed.mkdir()
    (crashed / "x.pt").write_bytes(b"half a tensor")

    latest = store.latest()

    assert latest is not None and latest.step == 2
    assert [info.step for info in store.list()] == [1, 2]
    assert store.load(latest)["x"].item() == 2


def test_empty_and_missing_stores(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists(), "the folder is made by the first save"
    assert store.list() == []
    assert store.latest() is None
    assert store.load_newest_intact() is None
    with pytest.raises(CheckpointError, match="manifest.json does not exist"):
        store.load(1)

    store.save(1, {"x": 1})
    assert (tmp_path / "new" / "run" / "step-000000001" / "manifest.json").is_file()


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_root_on_a_file_is_refused_before_anything_is_written(tmp_path: Path, under: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    with pytest.raises(CheckpointError, match=f"{blocker} is a file, not a folder"):
        CheckpointStore(str(blocker / under) if under else str(blocker))
    assert blocker.read_text() == "not a folder"


def test_unrelated_directories_are_ignored(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save(1, {"x": 1})
    for name in ("step-2", "logs", "step-abc"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")

    assert [info.step for info in store.list()] == [1]


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in range(1, 6):
        store.save(step * 100, {"x": torch.tensor(step)})

    assert [info.step for info in store.list()] == [400, 500]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000400", "step-000000500"]


def test_pruning_removes_stale_incomplete_dirs_only(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=3)
    for step in (1, 7):
        step_dir(tmp_path, step).mkdir()
        (step_dir(tmp_path, step) / "x.pt").write_bytes(b"partial")

    store.save(5, {"x": 5})

    assert not step_dir(tmp_path, 1).exists()
    assert step_dir(tmp_path, 7).exists(), "newer than every complete checkpoint: left alone"
    assert [info.step for info in store.list()] == [5]


def test_resaving_a_step_replaces_leftovers(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    crashed = step_dir(tmp_path, 4)
    crashed.mkdir()
    (crashed / "stale.pt").write_bytes(b"from a crashed attempt")

    store.save(4, {"x": torch.tensor(4)})

    assert sorted(p.name for p in crashed.iterdir()) == ["manifest.json", "x.pt"]
    assert store.load(4)["x"].item() == 4


def test_failure_while_writing_data_leaves_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(str(tmp_path))
    real_save = torch.save
    written: list[object] = []

    def failing_save(value: object, buffer: object) -> None:
        if written:
            raise OSError("disk full")
        written.append(value)
        real_save(value, buffer)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match="disk full"):
        store.save(1, {"first": torch.ones(1), "second": torch.ones(1)})

    assert written and not step_dir(tmp_path, 1).exists()  # the half-written files went
    assert store.list() == []
    assert store.latest() is None


def refuse_writes(monkeypatch: pytest.MonkeyPatch, error: int) -> None:
    """Every checkpoint file write fails with ``error`` after writing half its bytes (what
    a disk that fills up midway leaves)."""

    def write(self: CheckpointStore, path: str, data: bytes) -> dict[str, object]:
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(error, os.strerror(error), path)

    monkeypatch.setattr(CheckpointStore, "_write", write)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_storage_refusing_a_checkpoint_is_one_error_and_keeps_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    store = CheckpointStore(str(tmp_path), keep=1)
    store.save(2, {"model": torch.arange(4.0)})
    refuse_writes(monkeypatch, error)

    with pytest.raises(CheckpointWriteError) as caught:
        store.save(4, {"model": torch.arange(8.0)})

    message = str(caught.value)
    assert message.startswith(
        f"checkpoint storage: checkpoint step 4 cannot be written to {tmp_path}"
    )
    assert os.strerror(error) in message and "--resume" in message
    assert caught.value.resumable and caught.value.step == 4
    assert [info.step for info in store.list()] == [2]  # keep=1 pruned nothing for it
    assert store.load(2)["model"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not step_dir(tmp_path, 4).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_folder_is_one_error_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save(2, {"model": torch.arange(4.0)})
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(CheckpointWriteError, match=f"step 4 cannot be written to {tmp_path}"):
            store.save(4, {"model": torch.arange(8.0)})
    finally:
        tmp_path.chmod(0o700)
    assert [info.step for info in store.list()] == [2]


def test_old_checkpoints_that_cannot_be_removed_do_not_fail_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(str(tmp_path), keep=1)
    store.save(2, {"model": torch.arange(4.0)})

    def refuse(self: CheckpointStore, saved: int) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(CheckpointStore, "_prune", refuse)
    with caplog.at_level(logging.WARNING, logger="unlocked"):
        info = store.save(4, {"model": torch.arange(8.0)})

    assert info.step == 4 and [i.step for i in store.list()] == [2, 4]
    assert any("could not be removed" in m for m in caplog.messages)


def test_manifest_is_the_last_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(str(tmp_path))
    real_save = torch.save
    seen: list[list[str]] = []

    def watching_save(value: object, buffer: object) -> None:
        seen.append(sorted(p.name for p in step_dir(tmp_path, 2).iterdir()))
        real_save(value, buffer)

    monkeypatch.setattr(torch, "save", watching_save)
    store.save(2, {"a": 1, "b": 2, "c": 3})

    assert seen == [[], ["a.pt"], ["a.pt", "b.pt"]]
    assert (step_dir(tmp_path, 2) / "manifest.json").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_file_is_refused(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save(1, {"model": torch.arange(100.0), "opt": {"lr": 0.1}})
    target = step_dir(tmp_path, 1) / "model.pt"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-1]))
    else:
        target.unlink()

    with pytest.raises(CheckpointError) as caught:
        store.load(1)

    message = str(caught.value)
    assert str(target) in message
    assert f"checkpoint in {step_dir(tmp_path, 1)} is unusable" in message
    assert caught.value.directory == str(step_dir(tmp_path, 1))
    assert caught.value.cause.startswith(str(target))
    assert isinstance(caught.value, UserError)


def _damage(directory: Path, how: str) -> str:
    """Damage one checkpoint as storage can: the part of the cause the store reports."""
    model = directory / "model.pt"
    if how == "truncate":
        model.write_bytes(model.read_bytes()[:-7])
        return "bytes, expected"
    if how == "flip":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x40
        model.write_bytes(bytes(data))
        return "does not match its sha256 checksum"
    (directory / "manifest.json").write_text('{"format_version": 1, "fi')
    return "is not valid JSON"


@pytest.mark.parametrize("how", ["truncate", "flip", "manifest"])
def test_the_newest_intact_checkpoint_is_loaded_past_a_damaged_one(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(str(tmp_path), keep=3)
    for step in (2, 4, 6):
        store.save(step, {"model": torch.full((50,), float(step)), "opt": {"step": step}})
    cause = _damage(step_dir(tmp_path, 6), how)

    with caplog.at_level(logging.WARNING, logger="unlocked"):
        restored = store.load_newest_intact()

    assert restored is not None
    info, state = restored
    assert info.step == 4 and state["opt"] == {"step": 4}
    assert torch.equal(state["model"], torch.full((50,), 4.0))
    [line] = caplog.messages
    assert f"checkpoint {step_dir(tmp_path, 6)} is damaged and skipped" in line
    assert cause in line


def test_storage_that_cannot_be_read_stops_rather_than_passing_over_every_checkpoint(
    tmp_path: Path,
) -> None:
    """A failed read (here a folder where a file was; on a bucket, a timeout) is no proof
    of damage: skipping for it would restart the run from step 0."""
    store = CheckpointStore(str(tmp_path), keep=3)
    for step in (2, 4):
        store.save(step, {"model": torch.arange(4.0)})
    model = step_dir(tmp_path, 4) / "model.pt"
    model.unlink()
    model.mkdir()
    with pytest.raises(UserError, match=r"checkpoint storage: .*model\.pt cannot be read") as err:
        store.load_newest_intact()
    assert not isinstance(err.value, CheckpointError)


def test_no_intact_checkpoint_loads_none_and_reports_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in (1, 2):
        store.save(step, {"model": torch.arange(10.0)})
        _damage(step_dir(tmp_path, step), "truncate")

    with caplog.at_level(logging.WARNING, logger="unlocked"):
        assert store.load_newest_intact() is None

    assert [m.split(" is damaged")[0] for m in caplog.messages] == [
        f"checkpoint {step_dir(tmp_path, 2)}",
        f"checkpoint {step_dir(tmp_path, 1)}",
    ]
    assert store.steps() == [1, 2], "damaged checkpoints are reported, never deleted"


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None])
def test_unknown_format_version_is_refused(tmp_path: Path, version: int | None) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save(1, {"x": 1})
    manifest_path = step_dir(tmp_path, 1) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = version
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match=f"format_version {version!r}") as caught:
        store.load(1)
    assert str(manifest_path) in str(caught.value)


def test_unparseable_manifest_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save(1, {"x": 1})
    (step_dir(tmp_path, 1) / "manifest.json").write_text('{"format_version": 1, "fi')

    with pytest.raises(CheckpointError, match="not valid JSON"):
        store.load(1)


def test_file_uri_and_plain_paths_share_a_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "runs" / "a"
    by_uri = CheckpointStore(root.as_uri())
    assert by_uri.uri == root.as_uri()

    info = by_uri.save(3, {"w": torch.full((2,), 1.5)}, meta={"via": "uri"})

    monkeypatch.chdir(tmp_path)
    by_relative_path = CheckpointStore("runs/a")
    assert by_relative_path.uri == "runs/a"
    assert by_relative_path.list() == [info]
    assert torch.equal(by_relative_path.load(3)["w"], torch.full((2,), 1.5))
    by_relative_path.save(4, {"w": torch.zeros(2)})
    assert [i.step for i in by_uri.list()] == [3, 4]


def test_loading_refuses_pickled_objects(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save(1, {"evil": Payload(), "ok": torch.ones(1)})
    EXECUTED.clear()

    with pytest.raises(CheckpointError, match="evil.pt cannot be loaded safely"):
        store.load(1)
    assert EXECUTED == []


@pytest.mark.parametrize("key", ["", ".hidden", "a/b", "../up", 3])
def test_keys_must_be_file_names(tmp_path: Path, key: object) -> None:
    store = CheckpointStore(str(tmp_path))

    with pytest.raises(ValueError, match="cannot be a file name"):
        store.save(1, {key: 1})
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_meta_fails_before_writing(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))

    with pytest.raises(TypeError):
        store.save(1, {"x": 1}, meta={"when": object()})
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(str(tmp_path), keep=0)
    with pytest.raises(ValueError, match="non-negative"):
        CheckpointStore(str(tmp_path)).save(-1, {"x": 1})


def test_non_local_filesystem() -> None:
    # Arrow's in-memory "mock:" filesystem stands in for an object store: it is not a
    # LocalFileSystem, so the manifest is put directly instead of renamed into place.
    store = CheckpointStore("mock:///bucket/run", keep=2)
    assert store.list() == []

    for step in (1, 2, 3):
        store.save(step, {"w": torch.full((3,), float(step))}, meta={"step": step})

    assert [(info.step, info.path, info.meta) for info in store.list()] == [
        (2, "bucket/run/step-000000002", {"step": 2}),
        (3, "bucket/run/step-000000003", {"step": 3}),
    ]
    assert torch.equal(store.load(3)["w"], torch.full((3,), 3.0))


def test_a_skipped_damaged_checkpoint_does_not_count_against_keep(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=1)
    store.save(2, {"model": torch.zeros(10)})
    store.save(4, {"model": torch.ones(10)})
    store.save(2, {"model": torch.zeros(10)})  # went back to 2 (saving 4 had pruned it)
    _damage(step_dir(tmp_path, 4), "truncate")
    assert store.load_newest_intact()[0].step == 2

    store.save(3, {"model": torch.full((10,), 3.0)})  # the run went on from step 2

    assert store.steps() == [3, 4], "4 is left for the run to overwrite, 2 pruned"
    info, state = store.load_newest_intact()
    assert info.step == 3 and torch.equal(state["model"], torch.full((10,), 3.0))
