"""Revocation on the agent: CRLs from ``hatchery ca``, checked in real TLS handshakes on
loopback, replaced only by newer CRLs of the node's own CA, never a lock-out (issue 14)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hatchery import pki
from hatchery.revocation import CrlRefused, CrlStale, Revocations
from hatchery_lab.agent import Pki


def _serial(pair: pki.IssuedPair) -> int:
    return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


def _crl(made: Pki, serials: list[int], last: dt.datetime, next_: dt.datetime) -> bytes:
    """A CRL with chosen dates (``hatchery ca crl`` always makes a current one)."""
    ca = x509.load_pem_x509_certificate(made.ca.read_bytes())
    key = serialization.load_pem_private_key((made.root / "ca" / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
    builder = builder.last_update(last).next_update(next_)
    for s in serials:
        revoked = x509.RevokedCertificateBuilder().serial_number(s).revocation_date(last).build()
        builder = builder.add_revoked_certificate(revoked)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bool:
    """Whether a real TLS handshake between the two contexts succeeds on loopback."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="127.0.0.1"
        )
        data = await reader.read(2)
        writer.close()
        return data == b"ok"
    except (ssl.SSLError, ConnectionError):
        return False
    finally:
        server.close()


@pytest.fixture
def made(tmp_path: Path) -> Pki:
    return Pki.make(tmp_path / "pki")


def _contexts(made: Pki, client: pki.IssuedPair) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = pki.server_context(made.ca, made.server.cert, made.server.key)
    return server, pki.client_context(made.ca, client.cert, client.key)


async def test_revoked_client_is_refused_at_the_handshake_another_still_works(
    made: Pki, tmp_path: Path
) -> None:
    alice, bob = made.client("alice", "admin"), made.client("bob", "admin")
    server, _ = _contexts(made, alice)
    revocations = Revocations(tmp_path / "tls" / "crl.pem", made.ca, [server])
    revocations.start()
    assert await _handshake(server, _contexts(made, alice)[1])
    pki.revoke(made.root / "ca", str(alice.cert), "key_compromise")
    revocations.install((made.root / "ca" / pki.CRL_FILE).read_bytes())
    assert revocations.is_revoked(_serial(alice)) and not revocations.is_revoked(_serial(bob))
    assert not await _handshake(server, _contexts(made, alice)[1])
    assert await _handshake(server, _contexts(made, bob)[1])


async def test_a_peer_with_a_revoked_server_certificate_is_refused(
    made: Pki, tmp_path: Path
) -> None:
    """The agent's client context (image fetches from peers) checks the CRL too."""
    me = made.client("me", "node")
    other = pki.issue(made.root / "ca", "peer2", tmp_path / "peer2", groups=("node",),
                      server_names=("127.0.0.1",), client=True)  # fmt: skip
    _, client = _contexts(made, me)
    revocations = Revocations(tmp_path / "crl.pem", made.ca, [client])
    pki.revoke(made.root / "ca", f"{_serial(made.server):x}")
    (tmp_path / "crl.pem").write_bytes((made.root / "ca" / pki.CRL_FILE).read_bytes())
    revocations.start()
    revoked_peer = pki.server_context(made.ca, made.server.cert, made.server.key)
    good_peer = pki.server_context(made.ca, other.cert, other.key)
    assert not await _handshake(revoked_peer, client)
    assert await _handshake(good_peer, client)


async def test_an_old_crl_or_another_cas_crl_is_refused(made: Pki, tmp_path: Path) -> None:
    alice = made.client("alice", "admin")
    revocations = Revocations(tmp_path / "crl.pem", made.ca, [])
    pki.revoke(made.root / "ca", str(alice.cert))
    first = (made.root / "ca" / pki.CRL_FILE).read_bytes()
    pki.issue_crl(made.root / "ca")
    second = (made.root / "ca" / pki.CRL_FILE).read_bytes()
    assert revocations.install(second).number == 2
    with pytest.raises(CrlStale):
        revocations.install(first)
    with pytest.raises(CrlStale):
        revocations.install(second)  # the same one again is not newer
    other = Pki.make(tmp_path / "other")
    pki.issue_crl(other.root / "ca")
    pki.issue_crl(other.root / "ca")
    pki.issue_crl(other.root / "ca")
    with pytest.raises(CrlRefused, match="not signed by this node's CA"):
        revocations.install((other.root / "ca" / pki.CRL_FILE).read_bytes())
    with pytest.raises(CrlRefused):
        revocations.install(b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
    assert (tmp_path / "crl.pem").read_bytes() == second
    info = revocations.info()
    assert info is not None and info.number == 2 and info.revoked == 1


async def test_an_expired_crl_locks_no_one_out_and_still_refuses_its_serials(
    made: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSL refuses every certificate when the CRL has expired: the handshake check is
    switched off then, and the API's identity check (``is_revoked``) keeps the list."""
    alice, bob = made.client("alice", "admin"), made.client("bob", "admin")
    now = dt.datetime.now(dt.UTC)
    path = tmp_path / "crl.pem"
    path.write_bytes(_crl(made, [_serial(alice)], now - dt.timedelta(days=40),
                          now - dt.timedelta(days=10)))  # fmt: skip
    server, _ = _contexts(made, bob)
    caplog.set_level(logging.WARNING, logger="hatchery")
    revocations = Revocations(path, made.ca, [server])
    revocations.start()
    assert "expired or not yet valid" in caplog.text
    assert await _handshake(server, _contexts(made, bob)[1])
    assert revocations.is_revoked(_serial(alice))
    assert not server.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    # A fresh CRL brings the handshake check back.
    path.write_bytes(_crl(made, [_serial(alice)], now - dt.timedelta(minutes=1),
                          now + dt.timedelta(days=1)))  # fmt: skip
    revocations.refresh()
    assert server.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert not await _handshake(server, _contexts(made, alice)[1])
    assert await _handshake(server, _contexts(made, bob)[1])


async def test_no_crl_means_no_check_and_a_warning(
    made: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hatchery")
    server, _ = _contexts(made, made.client("bob", "admin"))
    revocations = Revocations(tmp_path / "absent.pem", made.ca, [server])
    revocations.start()
    assert "no CRL at" in caplog.text
    assert revocations.info() is None
    assert await _handshake(server, _contexts(made, made.client("bob", "admin"))[1])


async def test_the_file_is_reloaded_when_it_changes_and_a_bad_one_is_ignored(
    made: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = made.client("alice", "admin"), made.client("bob", "admin")
    path = tmp_path / "crl.pem"
    pki.revoke(made.root / "ca", str(alice.cert))
    path.write_bytes((made.root / "ca" / pki.CRL_FILE).read_bytes())
    server, _ = _contexts(made, bob)
    revocations = Revocations(path, made.ca, [server], poll=0.05)
    revocations.start()
    assert not revocations.is_revoked(_serial(bob))
    task = asyncio.create_task(revocations.run())
    try:
        pki.revoke(made.root / "ca", str(bob.cert))
        path.write_bytes((made.root / "ca" / pki.CRL_FILE).read_bytes())  # a plain copy
        for _ in range(100):
            if revocations.is_revoked(_serial(bob)):
                break
            await asyncio.sleep(0.05)
        assert revocations.is_revoked(_serial(bob))
        assert not await _handshake(server, _contexts(made, bob)[1])
        path.write_bytes(b"garbage")
        await asyncio.sleep(0.3)
        assert "ignored" in caplog.text
        assert revocations.is_revoked(_serial(bob)) and revocations.is_revoked(_serial(alice))
    finally:
        task.cancel()


def test_revoke_by_serial_and_the_list_beside_the_ca(made: Pki) -> None:
    alice = made.client("alice", "admin")
    serial = _serial(alice)
    entry, crl_path = pki.revoke(made.root / "ca", f"0x{serial:X}", "superseded")
    assert entry.serial == serial and entry.reason == "superseded"
    again, _ = pki.revoke(made.root / "ca", str(alice.cert), "key_compromise")
    assert again == entry, "revoking twice keeps the first entry"
    revoked = pki.read_revoked(made.root / "ca")
    assert revoked.serials() == {serial} and revoked.crl_number == 2
    crl = pki.load_crl(crl_path.read_bytes())
    assert pki.crl_number(crl) == 2 and crl.next_update_utc is not None
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    with pytest.raises(pki.PkiError, match="unknown revocation reason"):
        pki.revoke(made.root / "ca", f"{serial:x}", "because")
    with pytest.raises(pki.PkiError, match="neither a certificate file nor a hex serial"):
        pki.revoke(made.root / "ca", "nope")
    # Issued within one second, each CRL is still later than the last (OpenSSL uses the
    # latest lastUpdate of one CA's CRLs; an agent refuses one that is not later).
    dates = []
    for _ in range(3):
        dates.append(pki.load_crl(pki.issue_crl(made.root / "ca").read_bytes()).last_update_utc)
    assert dates == sorted(set(dates))
    (made.root / "ca" / pki.REVOKED_FILE).write_text("{broken")
    with pytest.raises(pki.PkiError, match="corrupt"):
        pki.issue_crl(made.root / "ca")
