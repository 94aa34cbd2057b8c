"""The rollout journal: every state change of every host, appended durably as JSON lines.

The first record (``start``) holds what a resume needs: target version, mode, options, the
hosts and the planned waves. Then one ``host`` record per state change, plus ``halt``,
``resume`` and ``end`` records. Each record is written and fsynced before the step it
announces: ``posting`` is durable before the upgrade request leaves, so after a crash a
host in ``posting`` or ``posted`` is re-checked (its version polled), never blindly re-POSTed.

Appends from many hosts share one fsync (group commit): a writer thread takes every record
queued meanwhile, writes them, fsyncs once and wakes their waiters.

Reading is tolerant of a crash: a torn last line (no newline, or not JSON) is ignored and cut
off before the next append; a bad line in the middle is corruption and an error. One
``flock`` on the file keeps two runs from writing one journal.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hatchery_rollout.errors import JournalError
from hatchery_rollout.vmreport import VmTally

log = logging.getLogger(__name__)


class HostState(StrEnum):
    PENDING = "pending"  # nothing done yet
    BASELINE = "baseline"  # health recorded before the upgrade (failing checks kept)
    SKIPPED = "skipped"  # already on the target version
    POSTING = "posting"  # about to send the upgrade request
    POSTED = "posted"  # the agent accepted it
    UPGRADED = "upgraded"  # the agent reports the target version, upgrade done
    DONE = "done"  # healthy (no new failures) and the post hook passed
    FAILED = "failed"


FINAL = frozenset({HostState.SKIPPED, HostState.DONE})
# States after which a resume must poll the host's version rather than send the request again.
SENT = frozenset({HostState.POSTING, HostState.POSTED, HostState.UPGRADED})


@dataclass(slots=True)
class HostRecord:
    state: HostState = HostState.PENDING
    baseline: tuple[str, ...] | None = None  # checks failing before the upgrade
    reason: str | None = None
    sent: bool = False  # an upgrade request may have reached the agent
    started: float | None = None
    finished: float | None = None
    vms: VmTally | None = None  # a reboot's VM report (fields of the done/failed record)


@dataclass(slots=True)
class JournalState:
    """What replaying a journal tells: the start record and each host's latest state."""

    start: dict[str, Any]
    hosts: dict[str, HostRecord] = field(default_factory=dict)
    halted: dict[str, Any] | None = None
    ended: dict[str, Any] | None = None
    resumes: int = 0
    torn: bool = False

    @property
    def version(self) -> str:
        return str(self.start["version"])

    @property
    def waves(self) -> list[list[str]]:
        return [list(map(str, w)) for w in self.start["waves"]]

    def counts(self) -> dict[HostState, int]:
        out = dict.fromkeys(HostState, 0)
        for rec in self.hosts.values():
            out[rec.state] += 1
        return out

    def degraded(self) -> list[tuple[str, str]]:
        """Hosts whose VMs did not all come back with their memory, and why."""
        return [
            (name, rec.vms.degraded)
            for name, rec in self.hosts.items()
            if rec.vms is not None and rec.vms.degraded is not None
        ]

    def failed(self) -> list[tuple[str, str]]:
        return [
            (name, rec.reason or "unknown")
            for name, rec in self.hosts.items()
            if rec.state is HostState.FAILED
        ]


def _apply(state: JournalState, rec: Mapping[str, Any]) -> None:
    kind = rec.get("t")
    if kind == "host":
        host = state.hosts.setdefault(str(rec["host"]), HostRecord())
        new = HostState(rec["state"])
        host.state = new
        if new is HostState.BASELINE:
            host.baseline = tuple(rec.get("failing", ()))
            host.started = float(rec["ts"])
        if new in SENT:
            host.sent = True
        if new is HostState.FAILED:
            host.reason = str(rec.get("reason", "unknown"))
        if new in FINAL or new is HostState.FAILED:
            host.finished = float(rec["ts"])
            host.vms = _vm_tally(rec)
    elif kind == "halt":
        state.halted = dict(rec)
    elif kind == "resume":
        state.resumes += 1
        state.halted = None
        state.ended = None
        if rec.get("retry_failed"):
            for host in state.hosts.values():
                if host.state is HostState.FAILED:  # keeps its baseline and sent flag
                    host.state = HostState.PENDING
                    host.reason = None
    elif kind == "end":
        state.ended = dict(rec)


def _vm_tally(rec: Mapping[str, Any]) -> VmTally | None:
    """A VM report from a host record (a reboot, or a live patch with refreshed VMs); None
    in records without one (a plain live patch, or a journal older than the report)."""
    if "resumed" not in rec:
        return None

    def count(key: str) -> int:
        value = rec.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    pause, degraded = rec.get("max_pause"), rec.get("degraded")
    return VmTally(
        resumed=count("resumed"),
        cold_started=count("cold_started"),
        not_restored=count("not_restored"),
        max_pause=float(pause) if isinstance(pause, int | float) else None,
        degraded=degraded if isinstance(degraded, str) else None,
        refreshed=count("refreshed"),
        refresh_failed=count("refresh_failed"),
    )


def _split(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int, bool]:
    """Records, the byte length of the intact part, and whether a torn tail was dropped.

    Every record is written with its newline in one write, so bytes after the last newline
    are a torn write; so is a last complete line that does not parse (a crash can leave
    zeros there). A bad line before that is corruption.
    """
    *body, tail = data.split(b"\n")
    records: list[dict[str, Any]] = []
    pos = 0
    for i, line in enumerate(body):
        if line.strip():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if i == len(body) - 1 and not tail:
                    return records, pos, True
                raise JournalError(
                    f"{path}: line {i + 1} is corrupt ({exc})",
                    hint="the journal is damaged in its middle; keep it aside and inspect it",
                ) from exc
            records.append(rec)
        pos += len(line) + 1
    return records, pos, bool(tail)


def read_journal(path: Path) -> JournalState:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise JournalError(f"{path}: no such journal") from None
    except OSError as exc:
        raise JournalError(f"{path}: cannot read: {exc.strerror}") from exc
    records, _, torn = _split(data, path)
    if not records or records[0].get("t") != "start":
        raise JournalError(f"{path}: not a rollout journal (no start record)")
    state = JournalState(start=records[0], torn=torn)
    for rec in records[1:]:
        try:
            _apply(state, rec)
        except (KeyError, ValueError, TypeError) as exc:
            raise JournalError(f"{path}: bad record {rec!r}: {exc}") from exc
    return state


class Journal:
    """An open journal: exclusive, append-only, every append durable before it returns."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._queue: list[tuple[bytes, asyncio.Future[None] | None]] = []
        self._broken: JournalError | None = None
        self._writer: asyncio.Task[None] | None = None
        self.fsyncs = 0

    @classmethod
    def create(cls, path: Path, start: Mapping[str, Any]) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC)
        except FileExistsError:
            raise JournalError(
                f"{path}: a journal already exists", hint="resume it: hatchery-rollout resume"
            ) from None
        journal = cls(path, fd)
        journal._lock()
        journal._write_now([_line({"t": "start", "ts": time.time(), **start})])
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return journal

    @classmethod
    def reopen(cls, path: Path) -> tuple[Journal, JournalState]:
        """Lock an existing journal, cut a torn tail, and return it with its replayed state."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            raise JournalError(f"{path}: no such journal") from None
        journal = cls(path, fd)
        journal._lock()
        state = read_journal(path)
        if state.torn:
            _, good, _ = _split(path.read_bytes(), path)
            log.warning("%s: dropping a torn last record (crash while writing)", path)
            os.ftruncate(fd, good)
            os.fsync(fd)
        return journal, state

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalError(
                f"{self.path}: in use by another hatchery-rollout",
                hint="wait for it to finish, or stop it first",
            ) from None

    def _write_now(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self.fsyncs += 1

    def append_sync(self, kind: str, **fields: Any) -> None:
        self._write_now([_line({"t": kind, "ts": time.time(), **fields})])

    async def append(self, kind: str, *, wait: bool = True, **fields: Any) -> None:
        """Queue a record; with ``wait``, return once it is on disk.

        Records reach the file in the order they were queued, so a record that is waited for
        makes every earlier one durable too: a host's intermediate states need not wait.
        """
        if self._broken is not None:
            raise self._broken
        fut = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append((_line({"t": kind, "ts": time.time(), **fields}), fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="journal-writer")
        if fut is not None:
            await fut

    async def host(self, name: str, state: HostState, *, wait: bool = True, **fields: Any) -> None:
        await self.append("host", wait=wait, host=name, state=str(state), **fields)

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await asyncio.to_thread(self._write_now, [line for line, _ in batch])
            except OSError as exc:
                # Nothing may be written after a lost record: every later append fails too.
                self._broken = JournalError(f"{self.path}: cannot write: {exc.strerror}")
                for _, fut in batch + self._queue:
                    if fut is not None and not fut.done():
                        fut.set_exception(self._broken)
                self._queue = []
                return
            for _, fut in batch:
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def aclose(self) -> None:
        if self._writer is not None:
            await self._writer
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _line(rec: Mapping[str, Any]) -> bytes:
    return json.dumps(rec, separators=(",", ":"), sort_keys=False).encode() + b"\n"
