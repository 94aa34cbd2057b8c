"""Birth tokens: how a machine being birthed proves, once, that it may fetch its seed.

A seed holds the node's private key, so it is never a public artefact. When the boot HTTP
service renders the iPXE script of MAC M for the address holding M's birth lease, it mints a
token bound to M and to that address; the script passes ``hatchery.seed=…/seed/<token>`` on
the kernel command line, and the booted node redeems it. A token is

* **random**: 32 bytes from the OS's CSPRNG (256 bits; guessing one is hopeless);
* **stored hashed**: the table keeps only its SHA-256, so a dump of the agent's memory or
  logs does not hand out live tokens, and lookups compare digests in constant time;
* **single-use**: redeeming burns it; a second request finds nothing;
* **short-lived**: it expires ``ttl`` seconds after minting (10 minutes by default: a slow
  node under TCG boots its kernel and initrd well inside that);
* **bound** to the MAC it was minted for and the address that asked for the script: a
  request from any other address finds nothing (and leaves the token alone, so a stranger's
  probe cannot deny the real machine its seed);
* **one per machine**: minting for M replaces M's previous token (a re-PXE-booted machine
  gets a fresh one through the same path), so the table never holds more tokens than there
  are machines with birth leases, and never more than ``capacity``.

This module is the pure core: no clock, no sockets, no files. The caller passes ``now`` (a
monotonic clock) and may pass the randomness source (tests do).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Callable
from dataclasses import dataclass

TOKEN_BYTES = 32
DEFAULT_TTL = 600.0
DEFAULT_CAPACITY = 1024


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class Grant:
    """A live token, as the table remembers it: its hash, never the token itself."""

    digest: bytes  # SHA-256 of the token
    mac: str  # the machine it was minted for (lower-case, colon-separated)
    ip: (
        ipaddress.IPv4Address | ipaddress.IPv6Address
    )  # the address that held the machine's birth lease at minting
    expires: float  # on the caller's monotonic clock


class BirthTokens:
    """The live birth tokens of one boot HTTP service: at most one per MAC.

    Not thread-safe: it lives on the event loop of the service that owns it.
    """

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        capacity: int = DEFAULT_CAPACITY,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if capacity < 1:
            raise ValueError("a token table needs room for at least one token")
        self.ttl, self.capacity = ttl, capacity
        self._random_bytes = random_bytes
        self._grants: dict[str, Grant] = {}  # MAC -> its one live grant

    def __len__(self) -> int:
        return len(self._grants)

    def mint(self, mac: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, now: float) -> str:
        """A new token for ``mac`` at ``ip``, valid until ``now + ttl``; it replaces any
        token ``mac`` had. The token is returned once and not kept."""
        self._prune(now)
        self._grants.pop(mac, None)
        while len(self._grants) >= self.capacity:  # only with more machines than capacity
            oldest = min(self._grants.values(), key=lambda g: g.expires)
            del self._grants[oldest.mac]
        raw = self._random_bytes(TOKEN_BYTES)
        if len(raw) < TOKEN_BYTES:
            raise ValueError(f"a birth token needs {TOKEN_BYTES} random bytes, got {len(raw)}")
        token = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
        self._grants[mac] = Grant(_digest(token), mac, ip, now + self.ttl)
        return token

    def redeem(
        self,
        token: str,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        now: float,
        still_bound: Callable[[Grant], bool] = lambda grant: True,
    ) -> Grant | None:
        """The grant of ``token`` if it is live, was minted for ``ip`` and ``still_bound``
        holds (the caller's check that the machine still holds its lease at that address);
        the token is then burnt. Otherwise None, and nothing changes.

        Every live digest is compared, in constant time, whatever the token: how long this
        takes says nothing about which token matched, or whether one did.
        """
        wanted = _digest(token)
        found: Grant | None = None
        for grant in self._grants.values():
            if hmac.compare_digest(grant.digest, wanted):
                found = grant
        if found is None or found.expires <= now or found.ip != ip or not still_bound(found):
            return None
        del self._grants[found.mac]
        return found

    def _prune(self, now: float) -> None:
        for grant in [g for g in self._grants.values() if g.expires <= now]:
            del self._grants[grant.mac]
