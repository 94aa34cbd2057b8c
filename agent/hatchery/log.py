"""One logging set-up for every Hatchery program: plain lines, %-style, DEBUG with --debug."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pyroute2 and qemu.qmp narrate every message at DEBUG: keep them to warnings.
    for noisy in ("pyroute2", "qemu.qmp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
