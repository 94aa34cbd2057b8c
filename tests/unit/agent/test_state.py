"""Atomic state writes: a crash at any instant leaves the old or the new file, never a mix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hatchery import state


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    state.write_json(path, {"a": 1})
    assert state.read_json(path) == {"a": 1}
    assert path.stat().st_mode & 0o777 == 0o600


def test_crash_between_write_and_rename_keeps_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pool.json"
    state.write_json(path, {"version": 1})

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "simulated power loss before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(state.StateError, match="cannot write"):
        state.write_json(path, {"version": 2})
    monkeypatch.undo()
    assert state.read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["pool.json"], "a temporary was left behind"


def test_a_temporary_left_by_a_real_crash_is_ignored(tmp_path: Path) -> None:
    """Process killed after writing the temporary, before the rename: the old file rules."""
    path = tmp_path / "vm.json"
    state.write_json(path, {"state": "running"})
    (tmp_path / f".vm.json.tmp-{os.getpid() + 1}").write_text('{"state": "stop')
    assert state.read_json(path) == {"state": "running"}
    assert [p for p, _ in state.iter_json_files(tmp_path)] == [path]


def test_corrupt_file_is_set_aside_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text('{"subnets": [')
    assert state.read_json(path) is None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("pool.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == '{"subnets": ['
    assert not path.exists()


def test_nested_records(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        state.write_json(tmp_path / name / "vm.json", {"name": name})
    (tmp_path / "c").mkdir()  # a folder without a record is skipped
    found = [json.dumps(v) for _, v in state.iter_json_files_nested(tmp_path, "vm.json")]
    assert found == ['{"name": "a"}', '{"name": "b"}']
