"""The node's logs for ``GET /v1/logs``: the journal where systemd runs, else the agent's own.

Which source answers is decided once, at the agent's start (``node_logs``):

- **journal**: systemd runs the node (``host.systemd_running``) and ``journalctl`` is
  installed. ``journalctl -o json`` is run through ``host.stream_lines`` (each line and the
  number of lines bounded), with arguments the agent builds itself: a unit name that passed
  ``check_unit`` and a time the agent computed (``--since=@EPOCH``); no client string
  reaches a command line unchecked, and nothing goes through a shell. Any unit of the node
  can be read; without one, the agent's own (``hatchery-agent.service``).
- **agent**: anywhere else (containers, tests): the agent's recent lines kept in memory
  (``log.RecentLog``: the last 2000, since the agent started). Only the agent's unit can be
  asked for; another unit is refused with ``LogsUnavailable``.

Entries are ``wire.LogEntry`` either way, so the CLI prints both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime
from typing import Protocol

from hatchery.errors import HatcheryError
from hatchery.host import AGENT_UNIT, stream_lines, systemd_running
from hatchery.log import LogLine, RecentLog
from hatchery.wire import LogEntry

#: A systemd unit name (systemd.unit(5): ASCII letters, digits, ``:-_.\``, ``@`` of a
#: template instance), not starting with ``-`` so it can never read as an option.
UNIT = re.compile(r"[A-Za-z0-9_.:@\\][A-Za-z0-9_.:@\\-]{0,254}")
_RELATIVE = re.compile(r"-?(\d{1,9})([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: A journal message is cut at this many bytes (journald's own LineMax is 48 KiB).
MAX_LINE = 64 * 1024
#: How often a follow of the agent's own log looks for new lines.
POLL = 0.2


class LogsUnavailable(HatcheryError):
    """This node cannot serve what was asked (another unit without a journal)."""


def check_unit(text: str) -> str:
    """``text`` if it is a unit name; ``ValueError`` saying why not."""
    if UNIT.fullmatch(text) is None:
        raise ValueError(f"{text[:64]!r} is not a systemd unit name")
    return text


def parse_since(text: str, now: float) -> float:
    """A start time as Unix seconds: ``10m``/``-10m`` (s, m, h, d ago), ``@EPOCH``, or an
    ISO 8601 time (``2026-12-02T08:00:00``, UTC unless it names an offset).

    :raise ValueError: none of those.
    """
    text = text.strip()
    if len(text) > 40:
        raise ValueError("too long for a time")
    if match := _RELATIVE.fullmatch(text):
        return now - int(match[1]) * _SECONDS[match[2]]
    if text.startswith("@") and text[1:].isdigit() and len(text) <= 12:
        return float(text[1:])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: 10m, 2h, @EPOCH or 2026-12-02T08:00:00"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


class LogSource(Protocol):
    """Where ``GET /v1/logs`` reads: ``name`` is ``journal`` or ``agent``."""

    name: str

    def check(self, unit: str | None) -> None:
        """:raise LogsUnavailable: ``unit`` cannot be read here."""
        ...

    def entries(
        self, unit: str | None, since: float | None, lines: int, follow: bool
    ) -> AsyncGenerator[LogEntry]:
        """The last ``lines`` entries of ``unit`` (None: the agent's) from ``since`` on,
        then, with ``follow``, new ones as they come, until the consumer stops."""
        ...


_PRIORITIES = ("critical", "critical", "critical", "error", "warning", "info", "info", "debug")


def journal_entry(data: Mapping[str, object]) -> LogEntry | None:
    """A ``journalctl -o json`` record as an entry; None for one without time or message.
    ``MESSAGE`` is a list of byte values when it was not valid UTF-8."""
    raw, stamp = data.get("MESSAGE"), data.get("__REALTIME_TIMESTAMP")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        raw = bytes(raw).decode(errors="replace")
    if not isinstance(raw, str) or not isinstance(stamp, str) or not stamp.isdigit():
        return None
    priority = data.get("PRIORITY")
    level = "info"
    if isinstance(priority, str) and priority.isdigit() and int(priority) < len(_PRIORITIES):
        level = _PRIORITIES[int(priority)]
    unit = data.get("_SYSTEMD_UNIT")
    source = data.get("SYSLOG_IDENTIFIER")
    return LogEntry(int(stamp) / 1e6, unit if isinstance(unit, str) else "", level,
                    source if isinstance(source, str) else "", raw)  # fmt: skip


class Journal:
    """The node's journal, through ``journalctl``."""

    name = "journal"

    def __init__(self, journalctl: str) -> None:
        self._journalctl = journalctl

    def check(self, unit: str | None) -> None:
        """Every unit of the node can be read."""

    def argv(self, unit: str | None, since: float | None, lines: int, follow: bool) -> list[str]:
        """The command line: built from checked values only."""
        argv = [self._journalctl, "--output=json", "--no-pager", "--quiet", f"--lines={lines}",
                f"--unit={check_unit(unit or AGENT_UNIT)}"]  # fmt: skip
        if since is not None:
            argv.append(f"--since=@{int(since)}")
        if follow:
            argv.append("--follow")
        return argv

    async def entries(
        self, unit: str | None, since: float | None, lines: int, follow: bool
    ) -> AsyncGenerator[LogEntry]:
        cap = None if follow else lines
        async with contextlib.aclosing(
            stream_lines(self.argv(unit, since, lines, follow), max_line=MAX_LINE, max_lines=cap)
        ) as output:
            async for line in output:
                try:
                    data = json.loads(line)
                except ValueError:
                    continue  # a line cut at MAX_LINE
                entry = journal_entry(data) if isinstance(data, dict) else None
                if entry is not None:
                    yield entry


class AgentLog:
    """The agent's own recent lines (``log.RecentLog``), where there is no journal."""

    name = "agent"

    def __init__(self, recent: RecentLog) -> None:
        self._recent = recent

    @staticmethod
    def _entry(line: LogLine) -> LogEntry:
        return LogEntry(line.time, AGENT_UNIT, line.level, line.logger, line.message)

    def check(self, unit: str | None) -> None:
        if unit is not None and unit != AGENT_UNIT:
            raise LogsUnavailable(
                f"this node has no journal (systemd does not run it): only the agent's own "
                f"log ({AGENT_UNIT}) can be read, not {unit}",
                hint="leave out --unit",
            )

    async def entries(
        self, unit: str | None, since: float | None, lines: int, follow: bool
    ) -> AsyncGenerator[LogEntry]:
        self.check(unit)
        every = self._recent.after(0)
        seq = every[-1].seq if every else 0
        kept = [x for x in every if since is None or x.time >= since]
        for line in kept[-lines:]:
            yield self._entry(line)
        while follow:
            await asyncio.sleep(POLL)
            for line in self._recent.after(seq):
                seq = line.seq
                yield self._entry(line)


def node_logs(recent: RecentLog) -> LogSource:
    """The journal where systemd runs this node and ``journalctl`` is installed, else the
    agent's own recent lines."""
    journalctl = shutil.which("journalctl")
    if journalctl is not None and systemd_running():
        return Journal(journalctl)
    return AgentLog(recent)
