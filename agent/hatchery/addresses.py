"""The address pool: (IP, MAC) pairs per subnet, handed to VMs one at a time.

Create takes a free pair, destroy returns it. The pool is written to disk (atomically)
*before* an allocation is returned, so an address is never handed out twice, across
restarts and crashes too. Subnets and addresses can also be added by hand, as in
SmallStack's low-level hypervisor operations.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatchery import state
from hatchery.errors import HatcheryError

IPv4 = ipaddress.IPv4Address


class PoolError(HatcheryError):
    """An allocation or pool change cannot be done."""


def mac_for(ip: IPv4) -> str:
    """A stable, locally administered unicast MAC derived from the IP (52:54 + the 4 bytes)."""
    return "52:54:" + ":".join(f"{b:02x}" for b in ip.packed)


def normalise_mac(mac: str) -> str:
    parts = mac.strip().lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise PoolError(f"bad MAC address {mac!r}")
    try:
        first = int(parts[0], 16)
        [int(p, 16) for p in parts]
    except ValueError as exc:
        raise PoolError(f"bad MAC address {mac!r}") from exc
    if first & 1:
        raise PoolError(f"{mac} is a multicast MAC address")
    return ":".join(parts)


@dataclass(frozen=True, slots=True)
class Subnet:
    bridge: str
    cidr: ipaddress.IPv4Network
    gateway: IPv4 | None
    dns: tuple[IPv4, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "bridge": self.bridge,
            "cidr": str(self.cidr),
            "gateway": str(self.gateway) if self.gateway else None,
            "dns": [str(d) for d in self.dns],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Subnet:
        return cls(
            d["bridge"],
            ipaddress.IPv4Network(d["cidr"]),
            IPv4(d["gateway"]) if d.get("gateway") else None,
            tuple(IPv4(x) for x in d.get("dns", [])),
        )


@dataclass(frozen=True, slots=True)
class Address:
    ip: IPv4
    mac: str
    subnet: Subnet


@dataclass(frozen=True, slots=True)
class PoolStats:
    total: int
    free: int


class AddressPool:
    """Thread-safe, persisted pool. ``owner`` is the VM's name, or None when free."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._subnets: list[Subnet] = []
        self._entries: dict[IPv4, tuple[str, str | None]] = {}  # ip -> (mac, owner)
        raw = state.read_json(path)
        if raw is not None:
            self._load(raw)

    def _load(self, raw: Any) -> None:
        try:
            self._subnets = [Subnet.from_json(s) for s in raw["subnets"]]
            for e in raw["addresses"]:
                self._entries[IPv4(e["ip"])] = (normalise_mac(e["mac"]), e.get("owner"))
        except (KeyError, TypeError, ValueError) as exc:
            state.set_aside(self._path, f"unexpected content: {exc}")
            self._subnets, self._entries = [], {}

    def _save(self) -> None:
        state.write_json(
            self._path,
            {
                "subnets": [s.to_json() for s in self._subnets],
                "addresses": [
                    {"ip": str(ip), "mac": mac, "owner": owner}
                    for ip, (mac, owner) in sorted(self._entries.items())
                ],
            },
        )

    def _subnet_of(self, ip: IPv4) -> Subnet | None:
        return next((s for s in self._subnets if ip in s.cidr), None)

    # --- subnets ----------------------------------------------------------------------
    def subnets(self) -> list[Subnet]:
        with self._lock:
            return list(self._subnets)

    def add_subnet(self, subnet: Subnet) -> bool:
        """Add ``subnet``; False if it is already there (same bridge and CIDR)."""
        with self._lock:
            for s in self._subnets:
                if s.cidr == subnet.cidr and s.bridge == subnet.bridge:
                    return False
                if s.cidr.overlaps(subnet.cidr):
                    raise PoolError(f"subnet {subnet.cidr} overlaps {s.cidr} on {s.bridge}")
            if subnet.gateway is not None and subnet.gateway not in subnet.cidr:
                raise PoolError(f"gateway {subnet.gateway} is outside {subnet.cidr}")
            self._subnets.append(subnet)
            self._save()
            return True

    # --- addresses ----------------------------------------------------------------------
    def add_addresses(self, pairs: list[tuple[IPv4, str | None]]) -> int:
        """Add (IP, MAC) pairs (MAC derived when None); return how many were new."""
        with self._lock:
            new: dict[IPv4, str] = {}
            macs_in_use = {mac for mac, _ in self._entries.values()}
            for ip, mac in pairs:
                subnet = self._subnet_of(ip)
                if subnet is None:
                    raise PoolError(f"{ip} is in no known subnet", hint="add the subnet first")
                if ip in (subnet.cidr.network_address, subnet.cidr.broadcast_address):
                    raise PoolError(f"{ip} is the network or broadcast address of {subnet.cidr}")
                if ip == subnet.gateway or ip in subnet.dns:
                    raise PoolError(f"{ip} is the gateway or a DNS server of {subnet.cidr}")
                norm = normalise_mac(mac) if mac else mac_for(ip)
                if ip in self._entries:
                    if self._entries[ip][0] != norm:
                        raise PoolError(
                            f"{ip} is already in the pool with MAC {self._entries[ip][0]}"
                        )
                    continue
                if norm in macs_in_use or norm in new.values():
                    raise PoolError(f"MAC {norm} is already in the pool")
                new[ip] = norm
            for ip, norm in new.items():
                self._entries[ip] = (norm, None)
            if new:
                self._save()
            return len(new)

    def add_range(self, start: IPv4, end: IPv4) -> int:
        if end < start:
            raise PoolError(f"range end {end} is before its start {start}")
        if int(end) - int(start) >= 65536:
            raise PoolError("a range may hold at most 65536 addresses")
        return self.add_addresses([(IPv4(i), None) for i in range(int(start), int(end) + 1)])

    def allocate(self, owner: str, bridge: str | None = None) -> Address:
        """Take the lowest free address (on ``bridge`` if given); persisted before returned."""
        with self._lock:
            for ip, (mac, holder) in sorted(self._entries.items()):
                subnet = self._subnet_of(ip)
                if holder is not None or subnet is None:
                    continue
                if bridge is not None and subnet.bridge != bridge:
                    continue
                self._entries[ip] = (mac, owner)
                try:
                    self._save()
                except state.StateError:
                    self._entries[ip] = (mac, None)
                    raise
                return Address(ip, mac, subnet)
        where = f" on bridge {bridge}" if bridge else ""
        raise PoolError(f"no free address{where}", hint="add addresses: hatchery pool add ...")

    def claim(self, ip: IPv4, owner: str) -> Address:
        """Mark ``ip`` as held by ``owner`` (re-adoption); idempotent for the same owner."""
        with self._lock:
            if ip not in self._entries:
                raise PoolError(f"{ip} is not in the pool")
            mac, holder = self._entries[ip]
            if holder not in (None, owner):
                raise PoolError(f"{ip} is held by {holder}")
            subnet = self._subnet_of(ip)
            assert subnet is not None
            if holder is None:
                self._entries[ip] = (mac, owner)
                self._save()
            return Address(ip, mac, subnet)

    def release(self, ip: IPv4, owner: str) -> None:
        with self._lock:
            entry = self._entries.get(ip)
            if entry is None or entry[1] != owner:
                return
            self._entries[ip] = (entry[0], None)
            self._save()

    def lookup_mac(self, mac: str) -> tuple[Address, str | None] | None:
        """The address with this MAC and its owner (for DHCP static leases)."""
        norm = normalise_mac(mac)
        with self._lock:
            for ip, (m, owner) in self._entries.items():
                if m == norm:
                    subnet = self._subnet_of(ip)
                    if subnet is not None:
                        return Address(ip, m, subnet), owner
        return None

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"ip": str(ip), "mac": mac, "owner": owner,
                 "bridge": s.bridge if (s := self._subnet_of(ip)) else None}
                for ip, (mac, owner) in sorted(self._entries.items())
            ]  # fmt: skip

    def stats(self) -> PoolStats:
        with self._lock:
            free = sum(1 for _, owner in self._entries.values() if owner is None)
            return PoolStats(len(self._entries), free)
