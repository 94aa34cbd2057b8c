"""One logging set-up for every Hatchery program: plain lines, %-style, DEBUG with --debug.

The agent also keeps its most recent lines in memory (``RecentLog``), so ``hatchery logs``
can show them on a node without a journal (tests, containers); where systemd runs, the
journal is read instead (``hatchery.logs``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pyroute2 and qemu.qmp narrate every message at DEBUG: keep them to warnings.
    for noisy in ("pyroute2", "qemu.qmp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
