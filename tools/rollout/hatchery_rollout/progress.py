"""Progress while a rollout runs: a live line on a TTY, plain periodic lines otherwise."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from hatchery_rollout.planner import format_duration


class Progress:
    """Counts hosts and estimates the time left from the measured per-host time.

    ETA (barrier model): the rest of the current wave plus one wave time per wave still to
    start; a wave lasts as long as its slowest host, so the measured mean wave time is used
    once a wave has finished, the mean host time before that.
    """

    def __init__(
        self,
        total: int,
        waves: int,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.total = total
        self.waves = waves
        self.wave = 0
        self.done = 0
        self.failed = 0
        self.in_flight = 0
        self._durations_sum = 0.0
        self._durations_n = 0
        self._wave_started = time.monotonic()
        self._waves_sum = 0.0
        self._waves_n = 0
        self._task: asyncio.Task[None] | None = None
        self._last_len = 0

    def start_wave(self, index: int) -> None:
        now = time.monotonic()
        if self.wave and self.in_flight == 0:
            self._waves_sum += now - self._wave_started
            self._waves_n += 1
        self.wave = index + 1
        self._wave_started = now

    def host_started(self) -> None:
        self.in_flight += 1

    def host_finished(self, ok: bool, seconds: float | None, *, started: bool = True) -> None:
        if started:
            self.in_flight -= 1
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if ok and seconds is not None:
            self._durations_sum += seconds
            self._durations_n += 1

    def mean_host_seconds(self) -> float | None:
        return self._durations_sum / self._durations_n if self._durations_n else None

    def eta(self) -> float | None:
        mean = self._waves_sum / self._waves_n if self._waves_n else self.mean_host_seconds()
        if mean is None:
            return None
        current = max(0.0, mean - (time.monotonic() - self._wave_started))
        return current + mean * max(0, self.waves - self.wave)

    def line(self) -> str:
        eta = self.eta()
        return (
            f"wave {self.wave}/{self.waves} · {self.done}/{self.total} done · "
            f"{self.failed} failed · {self.in_flight} in flight · "
            f"ETA {format_duration(eta) if eta is not None else '?'}"
        )

    def render(self) -> None:
        text = self.line()
        if self.tty:
            pad = max(0, self._last_len - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._last_len = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.render()

    def __enter__(self) -> Progress:
        self._task = asyncio.create_task(self._tick(), name="rollout-progress")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.render()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
