"""The agent's own recent log lines, the journal's reader and the one streaming runner.

Whatever is logged or printed, what the agent keeps and reads is bounded: a ring of at most
``capacity`` lines of at most ``max_line`` characters; a command's lines cut at
``max_line`` bytes and counted; nothing a client sends reaches a command line unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time

import pytest

from hatchery.errors import CommandError
from hatchery.host import AGENT_UNIT, stream_lines
from hatchery.log import RecentLog, recent_log
from hatchery.logs import AgentLog, Journal, LogsUnavailable, check_unit, journal_entry, parse_since


def _logger(handler: RecentLog, name: str = "hatchery.test.ring") -> logging.Logger:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    return logger


def test_the_ring_keeps_the_last_lines_each_cut() -> None:
    ring = RecentLog(capacity=100, max_line=50)
    log = _logger(ring)
    for i in range(1000):
        log.info("line %d %s", i, "y" * (i % 3) * 40)
    kept = ring.after(0)
    assert len(kept) == 100 and ring.last_seq == 1000
    assert kept[0].message.startswith("line 900") and kept[-1].message.startswith("line 999")
    assert all(len(x.message) <= 50 for x in kept)
    assert [x.seq for x in ring.after(995)] == [996, 997, 998, 999, 1000]
    assert ring.after(1000) == []
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    last = ring.after(1000)[0]
    assert last.level == "error" and last.message.startswith("failed\nTraceback")
    log.info("bad format %d", "not a number")  # logging's own error path, not ours
    assert ring.last_seq >= 1001


def test_the_ring_takes_lines_from_threads() -> None:
    ring = RecentLog(capacity=10_000)
    log = _logger(ring, "hatchery.test.threads")

    def spam(n: int) -> None:
        for i in range(500):
            log.info("t%d %d", n, i)

    threads = [threading.Thread(target=spam, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [x.seq for x in ring.after(0)]
    assert seqs == list(range(1, 4001))


def test_recent_log_is_installed_once() -> None:
    first = recent_log()
    assert recent_log() is first and first in logging.getLogger().handlers
    logging.getLogger().removeHandler(first)


async def test_the_agents_log_follows_new_lines() -> None:
    ring = RecentLog()
    log = _logger(ring, "hatchery.test.follow")
    log.info("old line")
    source = AgentLog(ring)
    seen: list[str] = []
    async with contextlib.aclosing(source.entries(None, None, 10, follow=True)) as entries:
        async with asyncio.timeout(5):
            async for entry in entries:
                seen.append(entry.message)
                assert entry.unit == AGENT_UNIT and entry.source == "hatchery.test.follow"
                if entry.message == "old line":
                    log.warning("new line")
                if entry.message == "new line":
                    assert entry.level == "warning"
                    break
    assert seen == ["old line", "new line"]


async def test_the_agents_log_since_lines_and_units() -> None:
    ring = RecentLog()
    log = _logger(ring, "hatchery.test.since")
    for i in range(5):
        log.info("n%d", i)
    source = AgentLog(ring)
    last_two = [e.message async for e in source.entries(None, None, 2, follow=False)]
    assert last_two == ["n3", "n4"]
    future = [e async for e in source.entries(AGENT_UNIT, time.time() + 60, 10, follow=False)]
    assert future == []
    with pytest.raises(LogsUnavailable, match="no journal"):
        source.check("ssh.service")


@pytest.mark.parametrize(
    "unit", ["x;rm", "a b", "-f", "../etc", "$(id)", "", "a" * 300, "x\nrm", "*", "ssh*"]
)
def test_unit_names_are_checked(unit: str) -> None:
    with pytest.raises(ValueError):
        check_unit(unit)


@pytest.mark.parametrize(
    "unit", ["hatchery-agent.service", "getty@ttyS0.service", "sys-kernel.mount", r"a\x2db.swap"]
)
def test_real_unit_names_pass(unit: str) -> None:
    assert check_unit(unit) == unit


def test_since_is_parsed_not_passed_on() -> None:
    now = 1_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("-2h", now) == now - 7200
    assert parse_since("1d", now) == now - 86400
    assert parse_since("@12345", now) == 12345
    assert parse_since("1970-01-02T00:00:00", now) == 86400  # UTC unless it says otherwise
    assert parse_since("1970-01-02T01:00:00+01:00", now) == 86400
    for bad in ("yesterday; rm -rf /", "--all", "10x", "@-1", "9" * 50, ""):
        with pytest.raises(ValueError):
            parse_since(bad, now)


def test_journalctl_gets_only_checked_values() -> None:
    journal = Journal("/usr/bin/journalctl")
    argv = journal.argv("ssh.service", 1234.9, 50, follow=True)
    assert argv == ["/usr/bin/journalctl", "--output=json", "--no-pager", "--quiet",
                    "--lines=50", "--unit=ssh.service", "--since=@1234", "--follow"]  # fmt: skip
    assert journal.argv(None, None, 1, False)[-1] == f"--unit={AGENT_UNIT}"
    with pytest.raises(ValueError):
        journal.argv("x;rm", None, 1, False)


def test_journal_records_read_tolerantly() -> None:
    entry = journal_entry({"MESSAGE": "hello", "__REALTIME_TIMESTAMP": "1500000",
                           "PRIORITY": "3", "_SYSTEMD_UNIT": "a.service",
                           "SYSLOG_IDENTIFIER": "a"})  # fmt: skip
    assert entry is not None
    assert (entry.time, entry.level, entry.unit, entry.source) == (1.5, "error", "a.service", "a")
    binary = journal_entry({"MESSAGE": [104, 255], "__REALTIME_TIMESTAMP": "1"})
    assert binary is not None and binary.message == "h\ufffd" and binary.level == "info"
    assert journal_entry({"MESSAGE": None, "__REALTIME_TIMESTAMP": "1"}) is None
    assert journal_entry({"MESSAGE": "x"}) is None
    assert journal_entry({"MESSAGE": [999], "__REALTIME_TIMESTAMP": "1"}) is None


PRINTER = "import sys\nfor a in sys.argv[1:]:\n    sys.stdout.write(a)\nsys.stdout.flush()\n"


async def test_stream_lines_bounds_length_and_count() -> None:
    argv = [sys.executable, "-c", PRINTER, "short\n", "x" * 100_000 + "\n", "after\n", "tail"]
    lines = [line async for line in stream_lines(argv, max_line=1000)]
    assert lines == ["short", "x" * 1000, "after", "tail"]
    many = [sys.executable, "-c", "while True: print('y' * 10, flush=True)"]
    started = time.monotonic()
    got = [line async for line in stream_lines(many, max_lines=500)]
    assert len(got) == 500 and time.monotonic() - started < 30  # killed, not waited for


async def test_stream_lines_reports_failure_and_kills_on_close() -> None:
    failing = "import sys; print('x'); sys.stderr.write('oops'); sys.exit(3)"
    with pytest.raises(CommandError, match="exited with 3: oops"):
        async for _ in stream_lines([sys.executable, "-c", failing]):
            pass
    sleeper = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(600)"
    endless = stream_lines([sys.executable, "-c", sleeper])
    async with contextlib.aclosing(endless) as lines:
        pid = int(await anext(lines))
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
