"""Only a client certificate is a caller: the API over real mutual TLS (issue 14).

A certificate's extended key usage says what it is for. One issued to serve (a node's, with
``server_names`` only) must not open the API as a caller, whatever groups it carries; an
agent's certificate is issued as both, because it is also the node's identity when it
fetches images from peers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hatchery import pki
from hatchery.addresses import AddressPool, Subnet
from hatchery.api.app import ApiContext, make_app
from hatchery.api.policy import load_policy
from hatchery.api.server import ApiServer
from hatchery.capacity import HostCapacity
from hatchery.health import NodeHealth
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import VmManager
from hatchery_lab.agent import Pki


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Pki, int]]:
    made = Pki.make(tmp_path / "pki")
    pool = AddressPool(tmp_path / "pool.db")
    pool.add_subnet(Subnet("br0", ipaddress.IPv4Network("10.5.0.0/24"), None, ()))
    manager = VmManager(tmp_path, pool, HostCapacity(8, 4096, 10_000), AccelChoice(Accel.TCG, "t"))
    app = make_app(ApiContext(manager, pool, load_policy(None), NodeHealth("v1"), time.time()))
    server = ApiServer(app, pki.server_context(made.ca, made.server.cert, made.server.key))
    await server.start("127.0.0.1", 0)
    try:
        yield made, server.port
    finally:
        await server.close()
        pool.close()


async def _get(made: Pki, port: int, cert: Path, key: Path, path: str = "/v1/pool") -> int:
    """The status of ``path`` for the holder of ``cert``; 0 when the handshake fails."""
    tls = pki.client_context(made.ca, cert, key)
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session,
            session.get(f"https://127.0.0.1:{port}{path}") as resp,
        ):
            return resp.status
    except (aiohttp.ClientError, ssl.SSLError):
        return 0


def _no_eku_cert(made: Pki, out: Path, group: str) -> tuple[Path, Path]:
    """A CA-signed certificate without an extended key usage (what another tool might make)."""
    ca_cert = x509.load_pem_x509_certificate(made.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((made.root / "ca" / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare"),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, group)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "bare.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "bare.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )  # fmt: skip
    )
    return out / "bare.pem", out / "bare.key"


def _usages(cert: Path) -> set[x509.ObjectIdentifier]:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    return set(loaded.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_issued_usages(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca")
    server = pki.issue(tmp_path / "ca", "s", tmp_path, server_names=("127.0.0.1",))
    client = pki.issue(tmp_path / "ca", "c", tmp_path, groups=("admin",))
    both = pki.issue(tmp_path / "ca", "n", tmp_path, server_names=("n",), client=True)
    assert _usages(server.cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert _usages(client.cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _usages(both.cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # The CLI: --server alone is a server certificate; --client makes an agent's (both).
    for name, extra, usages in (
        ("web", [], {ExtendedKeyUsageOID.SERVER_AUTH}),
        ("node-a", ["--client", "--group", "node"],
         {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
    ):  # fmt: skip
        cli = str(Path(sys.executable).parent / "hatchery")
        subprocess.run([cli, "ca", "issue", "--dir", str(tmp_path / "ca"), "--name", name,
                        "--server", "10.0.0.2", *extra, "--out", str(tmp_path / "cli")],
                       check=True, capture_output=True)  # fmt: skip
        assert _usages(tmp_path / "cli" / f"{name}.pem") == usages
    with pytest.raises(pki.PkiError):
        pki.issue(tmp_path / "ca", "x", tmp_path, client=False)
    with pytest.raises(pki.PkiError):
        pki.issue(tmp_path / "ca", "x", tmp_path, groups=("a*",))


async def test_a_server_certificate_is_no_caller(served: tuple[Pki, int], tmp_path: Path) -> None:
    made, port = served
    admin = made.client("alice", "admin")
    assert await _get(made, port, admin.cert, admin.key) == 200
    # Issued to serve, with the admin group in it: not a client credential.
    server_only = pki.issue(made.root / "ca", "srv", tmp_path / "srv", groups=("admin",),
                            server_names=("127.0.0.1",))  # fmt: skip
    # (OpenSSL's server already refuses it at the handshake: its purpose is not sslclient.)
    assert await _get(made, port, server_only.cert, server_only.key) in (0, 401)
    # No extended key usage at all (TLS lets it through): the API's resolver refuses it.
    bare_cert, bare_key = _no_eku_cert(made, tmp_path / "bare", "admin")
    assert await _get(made, port, bare_cert, bare_key) == 401
    # The agent's own certificate is both: a peer takes it as group node (images, health).
    agent = made.server
    assert await _get(made, port, agent.cert, agent.key, "/metrics") == 200
    assert await _get(made, port, agent.cert, agent.key, "/v1/vms") == 200
    assert await _get(made, port, agent.cert, agent.key, "/v1/pool") == 403
