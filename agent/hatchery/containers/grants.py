"""Single-use, VM-bound, short-lived tokens for a container VM's one image download.

A token is made for one boot of one VM (its uuid and start time): the first time that boot
asks for its container (``GET /hatchery/container``), never again for the same boot, so a VM
cannot mint itself more downloads. It is valid for ``ttl`` seconds, and once: the first
download that presents it uses it up, whether the download then succeeds or is refused.
Presented by another VM, it is refused and stays valid for its own VM (the request proves
only that a secret leaked, not who should lose it). Only the sha256 of a token is kept.

Held in memory: an agent restarted mid-boot makes a new token for a VM that asks again
(the old one is forgotten with the rest of the table).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_TTL = 120.0
MAX_GRANTS = 4096


class Verdict(StrEnum):
    OK = "ok"
    UNKNOWN = "unknown token"
    OTHER_VM = "the token belongs to another VM"
    USED = "the token was already used"
    EXPIRED = "the token expired"


@dataclass(slots=True)
class _Grant:
    vm: str
    digest: bytes
    expires: float
    used: bool = False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Grants:
    def __init__(self, ttl: float = DEFAULT_TTL, max_grants: int = MAX_GRANTS) -> None:
        self.ttl = ttl
        self.max_grants = max_grants
        self._by_boot: dict[tuple[str, float], _Grant] = {}
        # looked up by the token's sha256: a dict lookup of a hash of a 256-bit secret
        # leaks nothing usable through its timing
        self._by_digest: dict[bytes, _Grant] = {}

    def _drop(self, key: tuple[str, float]) -> None:
        grant = self._by_boot.pop(key)
        self._by_digest.pop(grant.digest, None)

    def issue(self, vm: str, boot: float, now: float) -> str | None:
        """A new token for this boot of ``vm``; None if this boot already had one."""
        if (vm, boot) in self._by_boot:
            return None
        self.forget(vm)  # an earlier boot's grant is void
        if len(self._by_boot) >= self.max_grants:
            self._drop(min(self._by_boot, key=lambda k: self._by_boot[k].expires))
        token = secrets.token_urlsafe(32)
        grant = _Grant(vm, _digest(token), now + self.ttl)
        self._by_boot[(vm, boot)] = grant
        self._by_digest[grant.digest] = grant
        return token

    def redeem(self, token: str, vm: str, now: float) -> Verdict:
        """Use ``token`` for ``vm``: OK once, within its time, for its own VM only."""
        grant = self._by_digest.get(_digest(token))
        if grant is None:
            return Verdict.UNKNOWN
        if grant.vm != vm:
            return Verdict.OTHER_VM
        if grant.used:
            return Verdict.USED
        grant.used = True
        return Verdict.EXPIRED if now >= grant.expires else Verdict.OK

    def forget(self, vm: str) -> None:
        for key in [k for k in self._by_boot if k[0] == vm]:
            self._drop(key)
