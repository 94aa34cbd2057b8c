"""``EventSummary``: events an attacker can cause are one log line per interval."""

from __future__ import annotations

import logging

import pytest

from hatchery.log import EventSummary

log = logging.getLogger("hatchery.test")


def test_one_line_per_interval_with_counts_and_the_last_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="hatchery")
    summary = EventSummary(log, "t", interval=60)
    summary.count("refused", "10.0.0.1", now=0.0)  # the first is logged at once
    for n in range(1000):
        summary.count("refused", f"10.0.0.{n % 250}", now=1.0 + n / 100)
        summary.count("timed out", now=1.0 + n / 100)
    assert [r.getMessage() for r in caplog.records] == ["t: 1 refused (the last from 10.0.0.1)"]
    summary.count("refused", "10.0.0.9", now=61.0)
    assert caplog.records[-1].getMessage() == (
        "t: 1001 refused, 1000 timed out (the last from 10.0.0.9)"
    )
    summary.flush(now=62.0, force=True)  # nothing pending: nothing written
    assert len(caplog.records) == 2
