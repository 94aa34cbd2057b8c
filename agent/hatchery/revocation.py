"""Certificate revocation on the agent: the CRL file, loaded into every TLS context it serves
or connects with, reloaded when it changes, replaced only by a newer CRL of the node's CA.

Where it is enforced:

- **At the TLS handshake**, both ways: the API's server context (a revoked client
  certificate is refused before any HTTP) and the client context the agent uses towards
  peers (a peer whose server certificate is revoked is refused when images are fetched).
  The contexts are changed *in place* (``load_verify_locations`` adds the CRL to their
  store, ``verify_flags`` gains ``VERIFY_CRL_CHECK_LEAF``), so every new connection uses the
  new CRL without a restart and without the listener or the fetcher knowing about it.
  OpenSSL picks the CRL with the latest ``lastUpdate`` when a store holds several of one
  issuer, and only a CRL with a later ``lastUpdate`` (and a higher number) than the one in
  force is accepted, so the store's older CRLs never win.
- **At the HTTP layer** too (``is_revoked``, asked by the API's identity resolver): the same
  serials answer 401. This is what still enforces the list while the CRL has expired.

Decisions, so that a CRL problem never locks the operators out of their nodes:

- No CRL file at start: no revocation check, one warning (``tls.crl`` names where it would
  be; ``PUT /v1/pki/crl`` or any file copy installs one, picked up within ``POLL`` seconds).
- The CRL has expired (``nextUpdate`` passed) or is not valid yet (clock skew): OpenSSL would
  then refuse *every* certificate, so the handshake check is switched off and the revoked
  serials are still refused by the HTTP layer (a warning at once and then hourly until a fresh
  CRL comes; peers' server certificates are then not checked: re-issue in time).
- A CRL file that does not parse, is not signed by the node's CA, or is older than the one
  loaded: ignored with an error in the log; the CRL loaded before stays in force.

Reload: the file's identity (inode, size, mtime) is checked every ``POLL`` seconds by a task
the agent owns (no signal handling: any tool that copies the file in place works), and at
once after ``install``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hatchery.errors import HatcheryError
from hatchery.pki import PkiError, cert_serial, crl_number, crl_signed_by, load_crl
from hatchery.state import StateError, write_atomic

log = logging.getLogger(__name__)

#: Seconds between two checks of the CRL file (and of the CRL's expiry).
POLL = 5.0
#: Seconds between two warnings that the CRL in force has expired.
WARN_EVERY = 3600.0


class CrlRefused(HatcheryError):
    """A CRL offered to the node is not one of its CA's, or does not parse."""


class CrlStale(HatcheryError):
    """A CRL offered to the node is not newer than the one it has."""


@dataclass(frozen=True, slots=True)
class CrlInfo:
    """What a person or a test wants to know about the CRL in force."""

    number: int | None
    last_update: dt.datetime
    next_update: dt.datetime | None
    revoked: int

    def to_json(self) -> dict[str, object]:
        return {
            "number": self.number,
            "last_update": self.last_update.isoformat(),
            "next_update": self.next_update.isoformat() if self.next_update else None,
            "revoked": self.revoked,
        }


def _info(crl: x509.CertificateRevocationList) -> CrlInfo:
    return CrlInfo(crl_number(crl), crl.last_update_utc, crl.next_update_utc, len(crl))


def _newer(new: x509.CertificateRevocationList, old: x509.CertificateRevocationList) -> bool:
    """Whether ``new`` supersedes ``old``: a later ``lastUpdate``, and a higher CRL number
    when both have one (RFC 5280 5.2.3: numbers increase). The later ``lastUpdate`` is what
    makes OpenSSL use it: a store holding several CRLs of one CA takes the latest, the first
    of equals (``hatchery ca crl`` makes each at least a second later than the last)."""
    a, b = crl_number(new), crl_number(old)
    if a is not None and b is not None and a <= b:
        return False
    return new.last_update_utc > old.last_update_utc


class Revocations:
    """The CRL at ``path`` (issued by a CA in ``ca``), applied to ``contexts``."""

    def __init__(
        self, path: Path, ca: Path, contexts: Sequence[ssl.SSLContext], *, poll: float = POLL
    ) -> None:
        self.path = path
        self.ca = ca
        self.poll = poll
        self._contexts = tuple(contexts)
        self._crl: x509.CertificateRevocationList | None = None
        self._serials: frozenset[int] = frozenset()
        self._seen: tuple[int, int, int] | None = None
        self._enforcing_tls = False
        self._warned = -WARN_EVERY

    # --- what the rest of the agent asks ---------------------------------------------------
    def is_revoked(self, serial: int) -> bool:
        return serial in self._serials

    def is_revoked_der(self, der: bytes) -> bool:
        serial = cert_serial(der)
        return serial is not None and self.is_revoked(serial)

    def info(self) -> CrlInfo | None:
        return _info(self._crl) if self._crl is not None else None

    # --- loading ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load the CRL once, before the API listens; say so when there is none."""
        self.refresh()
        if self._crl is None:
            log.warning("no CRL at %s: revoked certificates are not refused until one is "
                        "installed (hatchery ca crl, then PUT /v1/pki/crl)", self.path)  # fmt: skip

    def refresh(self) -> None:
        """Reload the file if it changed; switch the handshake check off or on as the CRL in
        force expires or becomes valid. Never raises: a bad file is logged and ignored."""
        try:
            st = os.stat(self.path)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            seen = None
        except OSError as exc:
            log.error("cannot read the CRL %s: %s", self.path, exc)
            seen = self._seen
        if seen != self._seen:
            self._seen = seen
            if seen is not None:
                try:
                    self._accept(self.path.read_bytes())
                except (OSError, HatcheryError) as exc:
                    log.error("CRL %s ignored (%s); the one loaded before stays in force",
                              self.path, exc)  # fmt: skip
        self._set_tls_check()

    def install(self, data: bytes) -> CrlInfo:
        """Make ``data`` the node's CRL: it must be signed by the node's CA and newer than the
        CRL in force (``CrlRefused``, ``CrlStale`` otherwise; nothing is written then). Written
        atomically to ``path``, applied at once."""
        crl = self._check(data)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as exc:
            raise HatcheryError(f"cannot install the CRL: {exc.strerror or exc}") from exc
        except StateError as exc:
            raise HatcheryError(f"cannot install the CRL: {exc.message}") from exc
        self.refresh()
        info = self.info()
        assert info is not None
        return info

    def _check(self, data: bytes) -> x509.CertificateRevocationList:
        try:
            crl = load_crl(data)
            ca_pem = self.ca.read_bytes()
        except PkiError as exc:
            raise CrlRefused(exc.message) from exc
        except OSError as exc:
            raise HatcheryError(f"cannot read the CA {self.ca}: {exc.strerror or exc}") from exc
        if not crl_signed_by(crl, ca_pem):
            raise CrlRefused("the CRL is not signed by this node's CA",
                             hint="issue it with hatchery ca crl on the fleet's CA")  # fmt: skip
        if self._crl is not None and not _newer(crl, self._crl):
            raise CrlStale(
                f"the CRL (number {crl_number(crl)}, {crl.last_update_utc:%Y-%m-%d %H:%M}) is "
                f"not newer than the one in force (number {crl_number(self._crl)}, "
                f"{self._crl.last_update_utc:%Y-%m-%d %H:%M})",
                hint="issue a new one with hatchery ca crl",
            )
        return crl

    def _accept(self, data: bytes) -> None:
        crl = self._check(data)
        self._apply(crl)
        self._crl = crl
        self._serials = frozenset(r.serial_number for r in crl)
        log.info("CRL %s in force: number %s, %d revoked, next update %s", self.path,
                 crl_number(crl), len(self._serials), crl.next_update_utc)  # fmt: skip

    def _apply(self, crl: x509.CertificateRevocationList) -> None:
        """Add ``crl`` to every context's store. The store loads CRLs from files only, so the
        checked bytes (not the file, which may have changed since) go through a private one."""
        with tempfile.NamedTemporaryFile(prefix="hatchery-crl-", suffix=".pem") as f:
            f.write(crl.public_bytes(serialization.Encoding.PEM))
            f.flush()
            for ctx in self._contexts:
                ctx.load_verify_locations(cafile=f.name)

    def _set_tls_check(self) -> None:
        crl = self._crl
        now = dt.datetime.now(dt.UTC)
        current = crl is not None and crl.last_update_utc <= now and (
            crl.next_update_utc is None or now < crl.next_update_utc
        )  # fmt: skip
        if crl is not None and not current and self._warn_due():
            log.warning("CRL %s is expired or not yet valid (%s .. %s): revoked certificates are "
                        "refused by the API only, not at the handshake; install a fresh one",
                        self.path, crl.last_update_utc, crl.next_update_utc)  # fmt: skip
        if current == self._enforcing_tls:
            return
        for ctx in self._contexts:
            if current:
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            else:
                ctx.verify_flags &= ~ssl.VERIFY_CRL_CHECK_LEAF
        self._enforcing_tls = current

    def _warn_due(self) -> bool:
        now = time.monotonic()
        if now - self._warned < WARN_EVERY:
            return False
        self._warned = now
        return True

    async def run(self) -> None:
        """Check the file every ``poll`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.poll)
            self.refresh()
