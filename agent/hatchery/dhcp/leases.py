"""Where DHCP addresses come from: static leases (the consumer-declared ``LeaseSource``) and
the dynamic leases of nodes being birthed (``BirthLeases``, persisted atomically).

The agent's address pool implements ``LeaseSource``; ``StaticLeases`` is the small
dict/file-backed implementation used by tests and ``hatchery-agent serve dhcp``.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import yaml

from hatchery import state
from hatchery.errors import ConfigError

log = logging.getLogger(__name__)

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")


def normalise_mac(text: str) -> str:
    """``52-54-00-AA-BB-CC`` or ``52:54:00:aa:bb:cc`` -> ``52:54:00:aa:bb:cc``; ValueError else."""
    value = text.strip().lower()
    if not _MAC_RE.match(value):
        raise ValueError(f"not a MAC address: {text!r}")
    return value.replace("-", ":")


def read_yaml(path: Path) -> Any:
    """A YAML (or JSON) file's content; unreadable or invalid is a ConfigError naming it."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Lease:
    """One client's address. ``boot`` says the client may be answered with PXE boot options."""

    mac: str
    ip: ipaddress.IPv4Address
    hostname: str | None = None
    boot: bool = False


class LeaseSource(Protocol):
    """What the DHCP responder needs from whoever owns static addresses (the address pool)."""

    def lookup(self, mac: str) -> Lease | None:
        """The lease for ``mac`` (lower-case, colon-separated), or None if unknown."""
        ...


class StaticLeases:
    """A ``LeaseSource`` over a fixed mapping; ``from_file`` reads YAML or JSON of the form
    ``{MAC: IP}`` or ``{MAC: {ip: IP, hostname: NAME, boot: BOOL}}``."""

    def __init__(self, leases: Mapping[str, Lease] | None = None) -> None:
        self._leases = {normalise_mac(m): lease for m, lease in (leases or {}).items()}

    def lookup(self, mac: str) -> Lease | None:
        return self._leases.get(mac)

    def __iter__(self) -> Iterator[Lease]:
        return iter(self._leases.values())

    @classmethod
    def from_mapping(cls, data: Any, where: str = "leases") -> StaticLeases:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping of MAC to address")
        leases: dict[str, Lease] = {}
        for key, value in data.items():
            try:
                mac = normalise_mac(str(key))
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            entry = value if isinstance(value, Mapping) else {"ip": value}
            unknown = set(entry) - {"ip", "hostname", "boot"}
            if unknown:
                raise ConfigError(f"{where}.{key}.{sorted(unknown)[0]}: unknown key")
            try:
                ip = ipaddress.IPv4Address(str(entry.get("ip")))
            except ValueError as exc:
                raise ConfigError(f"{where}.{key}.ip: not an IPv4 address") from exc
            hostname = entry.get("hostname")
            leases[mac] = Lease(mac, ip, str(hostname) if hostname else None,
                                bool(entry.get("boot", False)))  # fmt: skip
        return cls(leases)

    @classmethod
    def from_file(cls, path: Path) -> StaticLeases:
        return cls.from_mapping(read_yaml(path), str(path))


# The address family of a lease table: DHCPv4 births hand out IPv4, DHCPv6 births IPv6.
A = TypeVar("A", ipaddress.IPv4Address, ipaddress.IPv6Address)


@dataclass(frozen=True, slots=True)
class Binding(Generic[A]):
    mac: str
    ip: A
    expires: float  # wall-clock seconds (time.time()) after which the address is free again


class RangeLeases(Generic[A]):
    """Dynamic leases from one address range for nodes being birthed, keyed by MAC; the
    same table serves both families (``BirthLeases`` for DHCPv4, ``BirthLeases6`` for
    DHCPv6, where the MAC is the one the client's DUID or link-local address carries).

    Offers are held in memory for ``offer_hold`` seconds; committed leases (ACKed) are written
    to ``path`` (JSON, atomically) if a path is given. A corrupt file is moved aside to
    ``<name>.corrupt-<time>`` and reported, never silently overwritten. Declined addresses are
    skipped for ``decline_hold`` seconds (RFC 2131 section 4.3.3), but only when the client
    declining holds the offer or lease of that address: anyone else's DECLINE is ignored, or
    one forged packet would block an address for ten minutes.

    The tables cannot be grown without bound or made slow by a flood of forged requests
    (issue 14): every address is held by at most one offer, lease or decline, so each table
    stays within the range's size, and at most ``max_held`` in any case (a range may be a
    /8). Answering costs O(log n), never a scan: indexes by address answer "is it taken?";
    expired offers and declines are dropped from the front of their tables, which are kept
    in expiry order (each hold is a constant, so insertion order is expiry order); leases'
    expiries wait in a heap; and the lowest free address comes from a heap of addresses
    freed since (an address that was given and came back) or, failing that, from the part
    of the range never handed out yet (``_fresh``). Heap entries are checked when taken and
    dropped if the address was given away meanwhile: every address coming free again is
    pushed anew.

    Deciding never writes: a change (commit, release) only marks the leases ``unsaved``, and
    whoever sends the answer takes the write (``take_write``) and runs it first — the DHCP
    server in a worker thread, so an fsync never stalls the event loop. The client's ACK thus
    still follows its lease onto disk. ``save`` does both at once, for callers without a loop.
    """

    def __init__(
        self,
        start: A,
        end: A,
        path: Path | None = None,
        *,
        offer_hold: float = 60.0,
        decline_hold: float = 600.0,
        max_held: int = 4096,
    ) -> None:
        if end < start:
            raise ConfigError(f"birth range: end {end} is before start {start}")
        self.start: A = start
        self.end: A = end
        self.path = path
        self._family: type[A] = type(start)
        self.offer_hold, self.decline_hold = offer_hold, decline_hold
        self.max_held = max_held
        self._leases: dict[str, Binding[A]] = {}
        self._lease_ip: dict[A, str] = {}  # address -> MAC of its lease
        self._offers: dict[str, Binding[A]] = {}  # in expiry order
        self._offer_ip: dict[A, str] = {}  # address -> MAC of its offer
        self._declined: dict[A, float] = {}  # in expiry order
        self._lease_expiries: list[tuple[float, str, int]] = []  # heap: (expires, MAC, IP)
        self._freed: list[int] = []  # heap of addresses that came free (maybe stale)
        self._fresh = int(start)  # no address from here to ``end`` was handed out yet
        self._size = int(end) - int(start) + 1
        self._unsaved = False
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            doc = json.loads(raw)
            for item in doc["leases"]:
                b = Binding(normalise_mac(item["mac"]), self._family(item["ip"]),
                            float(item["expires"]))  # fmt: skip
                self._bind(b)
        except (ValueError, KeyError, TypeError) as exc:
            state.set_aside(path, str(exc))
            self._leases.clear()
            self._lease_ip.clear()

    def _bind(self, b: Binding[A]) -> None:
        """Record lease ``b``, replacing the MAC's old lease and any lease of the address."""
        old = self._leases.pop(b.mac, None)
        if old is not None and self._lease_ip.get(old.ip) == b.mac:
            del self._lease_ip[old.ip]
        other = self._lease_ip.get(b.ip)
        if other is not None:
            self._leases.pop(other, None)
        if old is not None and old.ip != b.ip:
            self._free(old.ip)
        self._leases[b.mac] = b
        self._lease_ip[b.ip] = b.mac
        heapq.heappush(self._lease_expiries, (b.expires, b.mac, int(b.ip)))

    def _changed(self) -> None:
        self._unsaved = self.path is not None

    @property
    def unsaved(self) -> bool:
        """Whether committed leases changed since the last ``take_write``."""
        return self._unsaved

    def take_write(self) -> Callable[[], None] | None:
        """The write of the leases as they are now, if they changed since the last one was
        taken (None otherwise). It blocks (fsync): run it in a worker thread, and one at a
        time, in the order taken. If it fails, call ``changed_again`` so a later one retries.

        The write raises ``StateError`` when the file cannot be written.
        """
        if not self._unsaved or self.path is None:
            return None
        self._unsaved = False
        path = self.path
        doc = {
            "leases": [
                {"mac": b.mac, "ip": str(b.ip), "expires": b.expires}
                for b in sorted(self._leases.values(), key=lambda b: int(b.ip))
            ]
        }

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            state.write_json(path, doc)

        return write

    def changed_again(self) -> None:
        """A taken write failed: the leases are unsaved again."""
        self._changed()

    def save(self) -> None:
        """Write unsaved changes now (blocking).

        :raise StateError: the file cannot be written.
        """
        write = self.take_write()
        if write is not None:
            try:
                write()
            except BaseException:
                self.changed_again()
                raise

    def __contains__(self, ip: A) -> bool:
        return self.start <= ip <= self.end

    def leases(self) -> tuple[Binding[A], ...]:
        return tuple(self._leases.values())

    @property
    def held(self) -> tuple[int, int]:
        """How many offers and declines are held in memory (for tests and benchmarks)."""
        return len(self._offers), len(self._declined)

    def binding(self, mac: str, now: float) -> Binding[A] | None:
        """The committed, unexpired lease of ``mac``."""
        b = self._leases.get(mac)
        return b if b is not None and b.expires > now else None

    def _free(self, ip: A) -> None:
        """``ip`` came free: the next lowest-free search may give it out."""
        if ip in self:
            heapq.heappush(self._freed, int(ip))
            if len(self._freed) > 2 * min(self._size, self.max_held * 3) + 64:
                self._freed = sorted(set(self._freed))  # drop repeats; a sorted list is a heap

    def _prune(self, now: float) -> None:
        """Drop expired offers and declines from the front of their (expiry-ordered) tables,
        and free the addresses of expired leases (kept, for the client's next request):
        O(log n) per entry, nothing scanned."""
        expiries = self._lease_expiries
        while expiries and expiries[0][0] <= now:
            expires, holder, raw_ip = heapq.heappop(expiries)
            lease = self._leases.get(holder)
            if lease is not None and lease.expires == expires and int(lease.ip) == raw_ip:
                self._free(lease.ip)
        offers = self._offers
        while offers:
            mac, b = next(iter(offers.items()))
            if b.expires > now:
                break
            self._drop_offer(mac)
        declined = self._declined
        while declined:
            ip, until = next(iter(declined.items()))
            if until > now:
                break
            del declined[ip]
            self._free(ip)

    def _drop_offer(self, mac: str) -> None:
        b = self._offers.pop(mac, None)
        if b is not None and self._offer_ip.get(b.ip) == mac:
            del self._offer_ip[b.ip]
            self._free(b.ip)

    def _lowest_free(self, mac: str, now: float) -> A | None:
        """The lowest address ``mac`` may have: the freed heap's or the never-given part's."""
        freed = self._freed
        while freed and self._taken(self._family(freed[0]), mac, now):
            heapq.heappop(freed)  # given away since: pushed again when it comes free
        end = int(self.end)
        while self._fresh <= end and self._taken(self._family(self._fresh), mac, now):
            self._fresh += 1  # taken by a request for it by name: freed later, then pushed
        if freed and (self._fresh > end or freed[0] < self._fresh):
            return self._family(heapq.heappop(freed))
        if self._fresh <= end:
            self._fresh += 1
            return self._family(self._fresh - 1)
        return None

    def _taken(self, ip: A, mac: str, now: float) -> bool:
        """Whether ``ip`` is held by anyone but ``mac`` (a lease, an offer or a decline)."""
        if self._declined.get(ip, 0.0) > now:
            return True
        holder = self._lease_ip.get(ip)
        if holder is not None and holder != mac and self._leases[holder].expires > now:
            return True
        holder = self._offer_ip.get(ip)
        return holder is not None and holder != mac and self._offers[holder].expires > now

    def offer(self, mac: str, requested: A | None, now: float) -> A | None:
        """Choose an address for ``mac`` (RFC 2131 4.3.1: its current or previous one, else the
        requested one if free, else the first free one) and hold it briefly; None if the
        range is full or ``max_held`` offers are held already."""
        self._prune(now)
        if mac not in self._offers and len(self._offers) >= self.max_held:
            return None
        choice: A | None = None
        previous = self._leases.get(mac) or self._offers.get(mac)
        for candidate in (previous.ip if previous else None, requested):
            if candidate is not None and candidate in self and not self._taken(candidate, mac, now):
                choice = candidate
                break
        if choice is None:
            choice = self._lowest_free(mac, now)
        if choice is not None:
            self._drop_offer(mac)  # re-inserted at the back: the table stays in expiry order
            self._offers[mac] = Binding(mac, choice, now + self.offer_hold)
            self._offer_ip[choice] = mac
        return choice

    def commit(self, mac: str, ip: A, lease_time: int, now: float) -> bool:
        """Bind ``ip`` to ``mac`` for ``lease_time`` seconds and persist; False if taken."""
        self._prune(now)
        if ip not in self or self._taken(ip, mac, now):
            return False
        self._drop_offer(mac)
        self._bind(Binding(mac, ip, now + lease_time))
        self._changed()
        return True

    def release(self, mac: str, ip: A | None = None) -> bool:
        b = self._leases.get(mac)
        self._drop_offer(mac)
        if b is None or (ip is not None and b.ip != ip):
            return False
        del self._leases[mac]
        if self._lease_ip.get(b.ip) == mac:
            del self._lease_ip[b.ip]
            self._free(b.ip)
        self._changed()
        return True

    def forget_offer(self, mac: str) -> None:
        self._drop_offer(mac)

    def holds(self, mac: str, ip: A, now: float) -> bool:
        """Whether ``mac`` holds ``ip`` now, by an unexpired offer or lease."""
        offer = self._offers.get(mac)
        lease = self._leases.get(mac)
        return any(b is not None and b.ip == ip and b.expires > now for b in (offer, lease))

    def decline(self, mac: str, ip: A, now: float) -> bool:
        """The client found ``ip`` in use: do not hand it out for a while.

        Honoured (True) only if ``mac`` holds ``ip``: RFC 2131 4.3.3 has the client decline
        the address the server gave *it*. Anyone else's DECLINE changes nothing (False).
        """
        self._prune(now)
        if ip not in self or not self.holds(mac, ip, now):
            return False
        if ip not in self._declined and len(self._declined) >= self.max_held:
            return False
        self._declined.pop(ip, None)  # re-inserted at the back: expiry order
        self._declined[ip] = now + self.decline_hold
        self.release(mac, ip)
        return True


class BirthLeases(RangeLeases[ipaddress.IPv4Address]):
    """The DHCPv4 server's birth leases."""


class BirthLeases6(RangeLeases[ipaddress.IPv6Address]):
    """The DHCPv6 server's birth leases: one address per machine (its MAC), whatever DUID
    or IAID its firmware and then its iPXE present, so the boot HTTP service can ask "who
    holds MAC's address?" as it does for IPv4."""
