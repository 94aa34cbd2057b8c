"""The journal: durable appends, replay, torn-tail tolerance, corruption, exclusivity."""

from __future__ import annotations

from pathlib import Path

import pytest

from hatchery_rollout.errors import JournalError
from hatchery_rollout.journal import HostState, Journal, read_journal

START = {"version": "v2", "mode": "live", "waves": [["a"], ["b", "c"]], "hosts": [], "options": {}}


async def test_append_and_replay(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, START)
    await journal.host("a", HostState.BASELINE, failing=["vms"])
    await journal.host("a", HostState.POSTING)
    await journal.host("b", HostState.SKIPPED)
    await journal.host("c", HostState.FAILED, reason="health: units: fail")
    await journal.append("halt", host="c", reason="health")
    await journal.aclose()
    state = read_journal(path)
    assert state.version == "v2" and state.waves == [["a"], ["b", "c"]]
    assert state.hosts["a"].state is HostState.POSTING and state.hosts["a"].sent
    assert state.hosts["a"].baseline == ("vms",)
    assert state.hosts["b"].state is HostState.SKIPPED
    assert state.failed() == [("c", "health: units: fail")]
    assert state.halted is not None and not state.torn


async def test_concurrent_appends_share_fsyncs(tmp_path: Path) -> None:
    import asyncio

    journal = Journal.create(tmp_path / "j.jsonl", START)
    await asyncio.gather(*(journal.host(f"h{i}", HostState.BASELINE) for i in range(200)))
    await journal.aclose()
    assert len(read_journal(tmp_path / "j.jsonl").hosts) == 200
    assert journal.fsyncs < 200


@pytest.mark.parametrize("tail", [b'{"t":"host","host":"a","sta', b'{"t":"host"}', b"\0\0\0\n"])
def test_torn_last_line_is_dropped_and_cut(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, START)
    journal.append_sync("host", host="a", state="posting")
    journal.close()
    intact = path.read_bytes()
    with path.open("ab") as f:
        f.write(tail)
    state = read_journal(path)
    assert state.torn and state.hosts["a"].state is HostState.POSTING
    journal, state = Journal.reopen(path)
    assert path.read_bytes() == intact  # the torn tail is cut before new appends
    journal.append_sync("resume")
    journal.close()
    assert not read_journal(path).torn


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    Journal.create(path, START).close()
    with path.open("ab") as f:
        f.write(b"garbage\n" + b'{"t":"end","ts":1}\n')
    with pytest.raises(JournalError, match="line 2 is corrupt"):
        read_journal(path)


def test_not_a_journal_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text('{"t":"host"}\n')
    with pytest.raises(JournalError, match="no start record"):
        read_journal(path)
    with pytest.raises(JournalError, match="no such journal"):
        read_journal(tmp_path / "none")


def test_exclusive_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    first = Journal.create(path, START)
    with pytest.raises(JournalError, match="already exists"):
        Journal.create(path, START)
    with pytest.raises(JournalError, match="in use"):
        Journal.reopen(path)
    first.close()
    second, _ = Journal.reopen(path)
    second.close()


def test_retry_failed_resets_failed_hosts(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, START)
    journal.append_sync("host", host="a", state="baseline", failing=[])
    journal.append_sync("host", host="a", state="posting")
    journal.append_sync("host", host="a", state="failed", reason="x")
    journal.append_sync("halt", host="a", reason="x")
    journal.append_sync("resume", retry_failed=True)
    journal.close()
    state = read_journal(path)
    a = state.hosts["a"]
    assert a.state is HostState.PENDING and a.sent and a.baseline == ()
    assert state.halted is None and state.resumes == 1
