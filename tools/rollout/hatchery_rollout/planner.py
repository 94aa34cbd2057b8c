"""The rollout plan: a pure function from hosts to ordered waves, and its predicted duration.

Waves grow by a *progression*: ``linear`` (1, 2, 3, …: about sqrt(2N) waves, SmallStack's
hyper-control), ``exponential`` (1, 2, 4, …) or an explicit list (``1,5,10%``: counts or
percentages of the fleet; the last value repeats). ``max_concurrency`` caps every wave.

Order: hosts without VMs go first (as Dominator does: a broken upgrade there hurts no guest),
otherwise the inventory order is kept. With ``spread`` set to a location level (``rack``), a
wave never holds two hosts of the same domain while another domain still has hosts to
upgrade: a wave is then cut to the number of domains left, and only when a single domain is
left does a wave take several of its hosts.

Predicted duration, two models with a constant time per host ``S``:

* barrier (what the executor does): a wave starts when the previous one is done, so the
  rollout takes ``waves × S``;
* window (Dominator's no-barrier variant): a window of concurrent upgrades starts at 1 and
  grows by one each time as many hosts have completed as the window is wide; a new host
  starts as soon as a slot is free. See ``predict_window``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

from hatchery_rollout.errors import PlanError
from hatchery_rollout.inventory import Host


class ProgressionKind(StrEnum):
    LINEAR = "linear"
    EXPONENTIAL = "exponential"
    EXPLICIT = "explicit"


@dataclass(frozen=True, slots=True)
class Step:
    """One value of an explicit progression: a count, or a percentage of the fleet."""

    value: float
    percent: bool = False

    def size(self, total: int) -> int:
        if self.percent:
            return max(1, math.ceil(total * self.value / 100))
        return max(1, int(self.value))

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


@dataclass(frozen=True, slots=True)
class Progression:
    kind: ProgressionKind = ProgressionKind.LINEAR
    steps: tuple[Step, ...] = ()

    def sizes(self, total: int) -> Iterator[int]:
        """Nominal wave sizes, forever."""
        i = 0
        while True:
            if self.kind is ProgressionKind.LINEAR:
                yield i + 1
            elif self.kind is ProgressionKind.EXPONENTIAL:
                yield 2 ** min(i, 62)
            else:
                yield self.steps[min(i, len(self.steps) - 1)].size(total)
            i += 1

    def __str__(self) -> str:
        if self.kind is ProgressionKind.EXPLICIT:
            return ",".join(str(s) for s in self.steps)
        return str(self.kind)


def parse_progression(text: str) -> Progression:
    """``linear``, ``exponential`` or a list such as ``1,5,10%``."""
    text = text.strip().lower()
    if text in (ProgressionKind.LINEAR, ProgressionKind.EXPONENTIAL):
        return Progression(ProgressionKind(text))
    steps: list[Step] = []
    for item in text.split(","):
        item = item.strip()
        percent = item.endswith("%")
        number = item[:-1] if percent else item
        try:
            value = float(number) if percent else int(number)
        except ValueError:
            raise PlanError(
                f"bad progression value {item!r}",
                hint="use linear, exponential or a list such as 1,5,10%",
            ) from None
        if value <= 0 or (percent and value > 100):
            raise PlanError(f"progression value {item!r} must be > 0 (and <= 100%)")
        steps.append(Step(value, percent))
    if not steps:
        raise PlanError("empty progression", hint="use linear, exponential or a list like 1,5,10%")
    return Progression(ProgressionKind.EXPLICIT, tuple(steps))


@dataclass(frozen=True, slots=True)
class PlanOptions:
    progression: Progression = Progression()
    max_concurrency: int | None = None
    spread: str | None = None  # a location level name, or "location" for the whole path
    empty_first: bool = True


@dataclass(frozen=True, slots=True)
class Plan:
    waves: tuple[tuple[Host, ...], ...]
    options: PlanOptions

    @property
    def hosts(self) -> int:
        return sum(len(w) for w in self.waves)

    def predict_barrier(self, host_seconds: float) -> float:
        return len(self.waves) * host_seconds


def spread_depth(spread: str | None, levels: Sequence[str]) -> int | None:
    """How many location parts make a failure domain for ``spread`` (None: no spread)."""
    if spread is None:
        return None
    if spread == "location":
        return 1 << 30
    if spread in levels:
        return list(levels).index(spread) + 1
    raise PlanError(
        f"unknown spread level {spread!r}",
        hint=f"use one of the inventory's levels ({', '.join(levels)}) or 'location'",
    )


def _order_key(index: int, host: Host, empty_first: bool) -> tuple[int, int]:
    has_vms = 0 if (not empty_first or host.vms == 0) else 1
    return (has_vms, index)


def make_plan(
    hosts: Sequence[Host],
    options: PlanOptions = PlanOptions(),
    levels: Sequence[str] = ("region", "building", "rack"),
) -> Plan:
    """Hosts → ordered waves (pure: no I/O, same input, same plan)."""
    if options.max_concurrency is not None and options.max_concurrency < 1:
        raise PlanError(f"max concurrency must be >= 1, not {options.max_concurrency}")
    depth = spread_depth(options.spread, levels)
    keyed = sorted(
        ((_order_key(i, h, options.empty_first), h) for i, h in enumerate(hosts)),
        key=lambda kh: kh[0],
    )
    total = len(keyed)
    cap = options.max_concurrency or total or 1
    sizes = options.progression.sizes(total)
    waves: list[tuple[Host, ...]] = []
    if depth is None:
        pos = 0
        while pos < total:
            size = min(next(sizes), cap)
            waves.append(tuple(h for _, h in keyed[pos : pos + size]))
            pos += size
        return Plan(tuple(waves), options)

    # Failure domains: each a queue in plan order; a heap picks the domain whose next host
    # comes first (empty hosts first), the fuller domain on a tie so no rack is left as a tail.
    queues: dict[tuple[str, ...], list[tuple[tuple[int, int], Host]]] = {}
    for kh in keyed:
        queues.setdefault(kh[1].location[:depth], []).append(kh)
    heads = {d: 0 for d in queues}

    def entry(d: tuple[str, ...]) -> tuple[int, int, int, tuple[str, ...]]:
        key = queues[d][heads[d]][0]
        return (key[0], -(len(queues[d]) - heads[d]), key[1], d)

    heap = [entry(d) for d in queues]
    heapq.heapify(heap)
    left = total
    while left:
        size = min(next(sizes), cap)
        wave: list[Host] = []
        taken: list[tuple[str, ...]] = []
        while heap and len(wave) < size:
            d = heapq.heappop(heap)[3]
            wave.append(queues[d][heads[d]][1])
            heads[d] += 1
            taken.append(d)
        remaining = [d for d in taken if heads[d] < len(queues[d])]
        if not heap and len(remaining) == 1:  # the only domain left: fill from it
            d = remaining[0]
            while len(wave) < size and heads[d] < len(queues[d]):
                wave.append(queues[d][heads[d]][1])
                heads[d] += 1
        for d in taken:
            if heads[d] < len(queues[d]):
                heapq.heappush(heap, entry(d))
        left -= len(wave)
        waves.append(tuple(wave))
    return Plan(tuple(waves), options)


def predict_window(hosts: int, host_seconds: float, max_concurrency: int | None = None) -> float:
    """Dominator's no-barrier model: the window grows by one per window-full of completions.

    Every host takes ``host_seconds``; a host starts whenever fewer than ``window`` are in
    flight; after each ``window`` completions since the last growth, ``window += 1``.
    """
    if hosts <= 0:
        return 0.0
    cap = max_concurrency or hosts
    window, done_since, started, now = 1, 0, 0, 0.0
    running: list[float] = []  # finish times
    while started < hosts or running:
        while started < hosts and len(running) < window:
            heapq.heappush(running, now + host_seconds)
            started += 1
        now = heapq.heappop(running)
        done_since += 1
        if done_since >= window:
            done_since = 0
            window = min(window + 1, cap)
    return now


def linear_steps(hosts: int) -> int:
    """Waves of a linear progression: the least k with k(k+1)/2 >= hosts."""
    k = math.isqrt(2 * hosts)
    while k * (k + 1) // 2 < hosts:
        k += 1
    while k > 0 and (k - 1) * k // 2 >= hosts:
        k -= 1
    return k


def format_duration(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    if seconds < 10 and seconds != s:
        return f"{seconds:.2f}s"
    return f"{sec}s"
