"""One logging set-up for every Hatchery program: plain lines, %-style, DEBUG with --debug.

Where stderr is the journal (a systemd service: ``JOURNAL_STREAM`` names stderr's device and
inode), each line carries its syslog priority as a ``<N>`` prefix instead of a time and a
level: journald keeps its own time, and reads the priority from the prefix, so the agent's
warnings and errors are warnings and errors there (``journalctl -p err``, ``hatchery logs
--json``'s ``level``), not all "info" as plain lines would be. Every line of a record gets
the prefix, a traceback's too (journald stores each line as an entry of its own), and so a
newline inside a logged value (a name a client chose) cannot start a line of a priority of
its own: journald reads only the first prefix, and ``<0>`` would be an emergency broadcast
to every terminal.

The agent also keeps its most recent lines in memory (``RecentLog``), so ``hatchery logs``
can show them on a node without a journal (tests, containers); where systemd runs, the
journal is read instead (``hatchery.logs``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass


def setup_logging(debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_the_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
    # pyroute2 and qemu.qmp narrate every message at DEBUG: keep them to warnings.
    for noisy in ("pyroute2", "qemu.qmp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stderr_is_the_journal() -> bool:
    """True when systemd connected stderr to the journal (``JOURNAL_STREAM``, systemd.exec(5)):
    the variable alone is not enough, a child with its stderr elsewhere inherits it."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        seen = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # no stderr, a closed or fake one
        return False
    return bool(expected) and expected == f"{seen.st_dev}:{seen.st_ino}"


def syslog_priority(levelno: int) -> int:
    """A logging level as a syslog priority (``<N>`` prefixes, sd-daemon(3))."""
    for floor, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                            (logging.INFO, 6)):  # fmt: skip
        if levelno >= floor:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>`` before every line of a record (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line the agent logged: ``seq`` counts every line since start (never reused)."""

    seq: int
    time: float
    level: str
    logger: str
    message: str


class RecentLog(logging.Handler):
    """The last ``capacity`` lines logged, each cut to ``max_line`` characters: a ring of
    bounded size (``capacity * max_line`` characters at most) whatever is logged, lost at a
    restart. Records may come from worker threads: ``emit`` runs under the handler's lock
    (``Handler.handle`` takes it) and readers take it too.
    """

    def __init__(self, capacity: int = 2000, max_line: int = 2048) -> None:
        super().__init__()
        self.capacity = capacity
        self.max_line = max_line
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._seq = 0
        self._format = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self._format.formatException(record.exc_info)
        except Exception:  # a bad %-format must not stop the logging of others
            message = str(record.msg)
        if len(message) > self.max_line:
            message = message[: self.max_line - 1] + "…"
        self._seq += 1
        self._lines.append(
            LogLine(self._seq, record.created, record.levelname.lower(), record.name, message)
        )

    def after(self, seq: int = 0) -> list[LogLine]:
        """The lines kept whose ``seq`` is over ``seq``, oldest first."""
        self.acquire()
        try:
            if self._seq <= seq:
                return []
            return [line for line in self._lines if line.seq > seq]
        finally:
            self.release()

    @property
    def last_seq(self) -> int:
        return self._seq


def recent_log() -> RecentLog:
    """The ``RecentLog`` on the root logger, installed at the first call (the agent's start):
    it keeps what the other handlers are given."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, RecentLog):
            return handler
    handler = RecentLog()
    root.addHandler(handler)
    return handler


class EventSummary:
    """Counts events and writes them as at most one WARNING line per ``interval`` seconds.

    For events an attacker can cause at will (refused connections, forged requests, a full
    address range): a line per event would let anyone who can reach a listener flood the
    journal (issue 14: ~500k lines in 22 s). The first event after a quiet interval is
    logged at once; later ones are counted into the next line. ``flush(force=True)`` writes
    what is pending (at shutdown). ``clock`` is injectable for code that is handed its time.
    """

    def __init__(
        self,
        logger: logging.Logger,
        name: str,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._name = name
        self._interval = interval
        self._clock = clock
        self._pending: Counter[str] = Counter()
        self._last_from = ""
        self._logged = float("-inf")

    def count(self, event: str, source: str = "", now: float | None = None) -> None:
        """One more ``event`` (from ``source``, if known); logs if the interval has passed."""
        self._pending[event] += 1
        if source:
            self._last_from = source
        self.flush(now)

    def flush(self, now: float | None = None, force: bool = False) -> None:
        now = self._clock() if now is None else now
        if not self._pending:
            return
        if not force and 0 <= now - self._logged < self._interval:
            return
        parts = ", ".join(f"{n} {event}" for event, n in sorted(self._pending.items()))
        last = f" (the last from {self._last_from})" if self._last_from else ""
        self._log.warning("%s: %s%s", self._name, parts, last)
        self._pending.clear()
        self._last_from = ""
        self._logged = now
