"""What the agent counts, for ``GET /metrics`` (the Prometheus text format).

One ``Metrics`` per agent holds every family in a registry of its own (never the library's
global one: two agents in one test process, or a standalone ``serve dhcp``, do not mix).
Each server records through a small *meter* made for it (``DhcpMeter``, ``TftpMeter``,
``HttpMeter``...), which names what that server counts and fixes its ``bridge`` label; a
server built without one gets a meter on a private registry, so it counts the same way
whether or not anything exports it.

Label values are bounded by construction: message types and outcomes are enums, HTTP
routes are the route *patterns* (``/v1/vms/{name}``, never the path a client sent) or
``other``, statuses are integers. A client cannot create series.

Gauges of state (VMs by state, pool, capacity) and the bridge rules' drop counters are read
when scraped, through collectors added with ``Metrics.add``: they are views of state the
agent keeps anyway.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# API latency: 1 ms to 10 s; the agent's routes answer in milliseconds unless something is wrong.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

Refresh = Callable[[], Awaitable[None]]

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double every counter for no use here


class Metrics:
    """Every family the agent exports, in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._refreshers: list[Refresh] = []
        self._listeners: list[tuple[str, str, Callable[[], Mapping[str, int]]]] = []
        r = self.registry
        self.add(ReadCollector([Reading(
            "hatchery_http_connections",
            "Connections to the HTTP listeners, by outcome (accepted, or why refused or cut).",
            ("server", "bridge", "outcome"), self._connections, counter=True,
        )]))  # fmt: skip
        self.http_requests = Counter(
            "hatchery_http_requests", "HTTP requests answered, by server, route and status.",
            ["server", "bridge", "route", "status"], registry=r,
        )  # fmt: skip
        self.http_seconds = Histogram(
            "hatchery_http_request_duration_seconds",
            "Time from a request's headers to its answer (before the body is streamed).",
            ["server", "route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.http_sent = Counter(
            "hatchery_http_sent_bytes", "Bytes of files sent whole (boot artefacts).",
            ["server", "bridge"], registry=r,
        )  # fmt: skip
        self.dhcp_messages = Counter(
            "hatchery_dhcp_messages", "DHCP messages received, by message type and outcome.",
            ["bridge", "type", "outcome"], registry=r,
        )  # fmt: skip
        self.dhcp_replies = Counter(
            "hatchery_dhcp_replies", "DHCP replies sent, by reply type and client kind.",
            ["bridge", "type", "client"], registry=r,
        )  # fmt: skip
        self.tftp_requests = Counter(
            "hatchery_tftp_requests", "TFTP read requests, by outcome (refused: why).",
            ["bridge", "outcome"], registry=r,
        )  # fmt: skip
        self.tftp_transfers = Counter(
            "hatchery_tftp_transfers", "TFTP transfers ended, by outcome.",
            ["bridge", "outcome"], registry=r,
        )  # fmt: skip
        self.tftp_sent = Counter(
            "hatchery_tftp_sent_bytes", "File bytes of completed TFTP transfers.",
            ["bridge"], registry=r,
        )  # fmt: skip
        self.tftp_timeouts = Counter(
            "hatchery_tftp_timeouts", "Retransmissions after a client did not answer in time.",
            ["bridge"], registry=r,
        )  # fmt: skip
        self.vm_events = Counter(
            "hatchery_vm_events", "VM lifecycle events (the state machine's), by event.",
            ["event"], registry=r,
        )  # fmt: skip
        self.upgrades = Counter(
            "hatchery_upgrades", "Upgrades ended on this node, by mode and outcome.",
            ["mode", "outcome"], registry=r,
        )  # fmt: skip

    def add(self, collector: Collector, refresh: Refresh | None = None) -> None:
        """A collector of state read at scrape time (``ReadCollector``, bridge drops);
        ``refresh`` is awaited before each scrape, for what must be read with I/O (the
        collectors themselves run on the event loop and must not block)."""
        self.registry.register(collector)
        if refresh is not None:
            self._refreshers.append(refresh)

    def _connections(self) -> list[tuple[tuple[str, ...], float]]:
        return [((server, bridge, outcome), n) for server, bridge, read in self._listeners
                for outcome, n in read().items()]  # fmt: skip

    async def scrape(self) -> bytes:
        """The exposition in the text format (0.0.4), every collector's state read now."""
        for refresh in self._refreshers:
            await refresh()
        return generate_latest(self.registry)

    # --- meters ---------------------------------------------------------------------------

    def http(self, server: str, bridge: str = "") -> HttpMeter:
        return HttpMeter(self, server, bridge)

    def dhcp(self, bridge: str) -> DhcpMeter:
        return DhcpMeter(self, bridge)

    def tftp(self, bridge: str = "") -> TftpMeter:
        return TftpMeter(self, bridge)

    def vms(self) -> VmMeter:
        return VmMeter(self)

    def upgrade(self) -> UpgradeMeter:
        return UpgradeMeter(self)


@dataclass(frozen=True, slots=True)
class HttpMeter:
    """One HTTP server's requests (``listener.count_requests`` records through it)."""

    metrics: Metrics
    server: str
    bridge: str = ""

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.metrics.http_requests.labels(self.server, self.bridge, route, str(status)).inc()
        self.metrics.http_seconds.labels(self.server, route).observe(seconds)

    def sent(self, size: int) -> None:
        self.metrics.http_sent.labels(self.server, self.bridge).inc(size)

    def track(self, connections: Callable[[], Mapping[str, int]]) -> None:
        """A listener's connection counts (by outcome), read at each scrape."""
        self.metrics._listeners.append((self.server, self.bridge, connections))


@dataclass(frozen=True, slots=True)
class DhcpMeter:
    metrics: Metrics
    bridge: str

    def received(self, kind: str, outcome: str) -> None:
        self.metrics.dhcp_messages.labels(self.bridge, kind, outcome).inc()

    def replied(self, kind: str, client: str) -> None:
        self.metrics.dhcp_replies.labels(self.bridge, kind, client).inc()


@dataclass(frozen=True, slots=True)
class TftpMeter:
    """Safe from the transfer threads: the library's counters take a lock."""

    metrics: Metrics
    bridge: str = ""

    def request(self, outcome: str) -> None:
        self.metrics.tftp_requests.labels(self.bridge, outcome).inc()

    def ended(self, outcome: str, sent: int, timeouts: int) -> None:
        self.metrics.tftp_transfers.labels(self.bridge, outcome).inc()
        if sent:
            self.metrics.tftp_sent.labels(self.bridge).inc(sent)
        if timeouts:
            self.metrics.tftp_timeouts.labels(self.bridge).inc(timeouts)


@dataclass(frozen=True, slots=True)
class VmMeter:
    metrics: Metrics

    def event(self, name: str) -> None:
        self.metrics.vm_events.labels(name).inc()


@dataclass(frozen=True, slots=True)
class UpgradeMeter:
    metrics: Metrics

    def ended(self, mode: str, outcome: str) -> None:
        self.metrics.upgrades.labels(mode, outcome).inc()


@dataclass(frozen=True, slots=True)
class Reading:
    """One family read at scrape time: ``read`` returns (label values, value) pairs. A
    ``counter`` only grows (restarts count as resets, as Prometheus expects); else a gauge."""

    name: str
    help: str
    labels: tuple[str, ...]
    read: Callable[[], Iterable[tuple[tuple[str, ...], float]]]
    counter: bool = False


class ReadCollector(Collector):
    """Families of state the agent keeps anyway (VMs, pool, capacity, nft counters)."""

    def __init__(self, readings: Iterable[Reading]) -> None:
        self.readings = tuple(readings)

    def collect(self) -> Iterator[Metric]:
        for reading in self.readings:
            kind = CounterMetricFamily if reading.counter else GaugeMetricFamily
            family = kind(reading.name, reading.help, labels=list(reading.labels))
            for values, value in reading.read():
                family.add_metric(list(values), value)
            yield family
