"""HTTPS boot on loopback: the boot HTTP service's TLS port (a boot certificate from an RSA
boot CA), the unified kernel image it streams to the lease holder, and the checks around it
(a client pinning another CA fails the handshake, a stranger gets a 404, the certificate must
name the address served, the seed stays on the plain port).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hatchery import pki
from hatchery.boothttp.app import BootHttpConfig, BootHttpServer, boot_tls_context
from hatchery.boothttp.profiles import Profiles
from hatchery.boothttp.seeds import SeedFolder
from hatchery.boothttp.uki import sections
from hatchery.config import DEFAULT_UKI_STUB, BootHttpsConfig, BootServiceConfig, parse_config
from hatchery.dhcp.responder import BootConfig
from hatchery.dhcp6.responder import Boot6Config
from hatchery.errors import ConfigError
from hatchery.images.store import ImageStore
from hatchery.netboot import Netboot
from hatchery.sealing import SeedKey
from tests.conftest import missing

MAC = "52:54:00:b1:48:01"
HOLDER, STRANGER = "127.0.0.1", "127.0.0.2"
KERNEL = bytes(range(256)) * 4000 + b"end of kernel"  # not a multiple of any alignment
INITRD = b"\x07" * 3_000_001
SEED = b"hatchery/tls/agent.key" * 10
SEED_URL = re.compile(rb"hatchery\.seed=(http://[^ ]+)/seed/([A-Za-z0-9_-]{43})")


@dataclass
class Leases:
    def birth_address(self, mac: str, version: int) -> ipaddress.IPv4Address | None:
        return ipaddress.IPv4Address(HOLDER) if mac == MAC and version == 4 else None


@dataclass
class Running:
    server: BootHttpServer
    ca: Path  # the boot CA's certificate

    def url(self, path: str, tls: bool = True) -> str:
        port = self.server.tls_port if tls else self.server.port
        return f"{'https' if tls else 'http'}://{HOLDER}:{port}{path}"


@pytest.fixture
def boot_ca(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "boot-ca", "Boot CA", rsa_keys=True)
    return tmp_path / "boot-ca"


@pytest.fixture
async def running(tmp_path: Path, boot_ca: Path) -> AsyncIterator[Running]:
    if not DEFAULT_UKI_STUB.exists():
        missing(f"no {DEFAULT_UKI_STUB} (package systemd-boot-efi)")
    root = tmp_path / "artefacts" / "hypervisor" / "current"
    root.mkdir(parents=True)
    (root / "vmlinuz").write_bytes(KERNEL)
    (root / "initrd").write_bytes(INITRD)
    seeds = tmp_path / "seeds"
    seeds.mkdir(mode=0o700)
    (seeds / f"{MAC}.tar").write_bytes(SEED)
    profiles = Profiles.load(Path(__file__).resolve().parents[3] / "pxe" / "profiles.yaml")
    config = BootHttpConfig(tmp_path / "artefacts", profiles, births=Leases(),
                            seeds=SeedFolder(seeds))  # fmt: skip
    cert = pki.issue(boot_ca, "node-a-boot", tmp_path / "boot", server_names=(HOLDER,))
    server = BootHttpServer(config, HOLDER, 0, tls=boot_tls_context(cert.cert, cert.key))
    await server.start()
    try:
        yield Running(server, boot_ca / pki.CA_CERT)
    finally:
        await server.stop()


def pinned(ca: Path) -> ssl.SSLContext:
    """What the firmware does: trust the boot CA alone, check the address in the cert."""
    return ssl.create_default_context(cafile=str(ca))


async def fetch(
    url: str,
    method: str = "GET",
    tls: ssl.SSLContext | None = None,
    source: str = HOLDER,
    body: bytes | None = None,
) -> tuple[int, bytes, int]:
    """Status, body and Content-Length."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True, ssl=tls or False)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.request(method, url, data=body) as resp:
            return resp.status, await resp.read(), int(resp.headers.get("Content-Length", -1))


async def test_the_holder_gets_its_uki_over_https(running: Running) -> None:
    tls = pinned(running.ca)
    path = f"/boot/uki.efi?mac={MAC}"
    status, body, length = await fetch(running.url(path), "HEAD", tls)
    assert status == 200 and body == b""  # the size first, as UEFI HTTP Boot asks
    status, image, got_length = await fetch(running.url(path), tls=tls)
    assert status == 200 and len(image) == length == got_length
    found = sections(image)
    linux, initrd, cmdline = found[".linux"], found[".initrd"], found[".cmdline"]
    assert image[linux.raw_offset : linux.raw_offset + linux.virtual_size] == KERNEL
    assert image[initrd.raw_offset : initrd.raw_offset + initrd.virtual_size] == INITRD
    line = image[cmdline.raw_offset : cmdline.raw_offset + cmdline.virtual_size]
    assert (
        b"hatchery.role=hypervisor" in line
        and f"BOOTIF=01-{MAC.replace(':', '-')}".encode() in line
    )
    # The seed URL names the plain port (the node's seed fetcher pins no boot CA; the seed
    # is sealed to the newborn's key), and the token the GET minted redeems there once.
    match = SEED_URL.search(line)
    assert match is not None, line
    assert match.group(1).decode() == f"http://{HOLDER}:{running.server.port}"
    key = SeedKey()
    seed_url = running.url(f"/seed/{match.group(2).decode()}", tls=False)
    status, sealed, _ = await fetch(seed_url, "POST", body=key.public)
    assert status == 200 and key.open(sealed) == SEED


async def test_a_client_pinning_another_ca_fails_the_handshake(
    running: Running, tmp_path: Path
) -> None:
    pki.init_ca(tmp_path / "other-ca", "Boot CA", rsa_keys=True)
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await fetch(running.url(f"/boot/uki.efi?mac={MAC}"),
                    tls=pinned(tmp_path / "other-ca" / pki.CA_CERT))  # fmt: skip


async def test_only_the_lease_holder_gets_a_uki(running: Running) -> None:
    tls = pinned(running.ca)
    status, body, _ = await fetch(running.url(f"/boot/uki.efi?mac={MAC}"), tls=tls,
                                  source=STRANGER)  # fmt: skip
    assert status == 404 and b"no birth lease" in body
    status, _, _ = await fetch(running.url("/boot/uki.efi?mac=nonsense"), tls=tls)
    assert status == 400


async def test_plain_http_and_the_same_routes_still_answer(running: Running) -> None:
    status, body, _ = await fetch(running.url(f"/boot/ipxe?mac={MAC}", tls=False))
    assert status == 200 and body.startswith(b"#!ipxe")
    status, body, _ = await fetch(running.url("/artefacts/hypervisor/current/vmlinuz"),
                                  tls=pinned(running.ca))  # fmt: skip
    assert status == 200 and body == KERNEL


async def test_no_stub_no_uki(running: Running, tmp_path: Path) -> None:
    await running.server.stop()
    config = BootHttpConfig(running.server.config.root, running.server.config.profiles,
                            uki_stub=tmp_path / "absent.stub")  # fmt: skip
    server = BootHttpServer(config, HOLDER, 0)
    await server.start()
    try:
        status, body, _ = await fetch(f"http://{HOLDER}:{server.port}/boot/uki.efi?mac={MAC}")
        assert status == 404 and b"no boot image" in body
    finally:
        await server.stop()


# --- the pieces around it -----------------------------------------------------------------------


def test_uefi_http_clients_are_sent_to_the_uki_only_with_https() -> None:
    plain = BootConfig("http://10.0.0.1:8080")
    assert plain.http_boot_url(MAC) == "http://10.0.0.1:8080/ipxe/ipxe.efi"
    https = BootConfig("http://10.0.0.1:8080", https_base="https://10.0.0.1:8443")
    assert https.http_boot_url(MAC) == f"https://10.0.0.1:8443/boot/uki.efi?mac={MAC}"
    six = Boot6Config("http://[fd00::1]:8080", https_base="https://[fd00::1]:8443")
    assert six.http_boot_url(MAC) == f"https://[fd00::1]:8443/boot/uki.efi?mac={MAC}"
    assert six.http_boot_url(None) == "http://[fd00::1]:8080/ipxe/ipxe.efi"


@pytest.mark.parametrize("name", ["ipxe.efi", "snponly.efi"])
def test_debians_ipxe_speaks_http_but_not_https(name: str) -> None:
    """Why HTTPS boot skips iPXE (docs/netboot.md): iPXE registers each URI scheme it was
    built with under its name, and Debian's EFI builds (uncompressed, so readable here) name
    ``http`` and not ``https``, with no X.509 code at all. If Debian ever builds iPXE with
    HTTPS this fails, and the docs and the boot paths should change with it."""
    path = Path("/usr/lib/ipxe") / name
    if not path.exists():
        missing(f"no {path} (package ipxe)")
    binary = path.read_bytes()
    assert b"\0http\0" in binary
    assert b"\0https\0" not in binary and b"x509" not in binary.lower()


def test_boot_https_config() -> None:
    bridge = {"name": "br0", "boot": {"https": {"cert": "/b/c.pem", "key": "/b/c.key"}}}
    boot = parse_config({"bridges": [bridge]}).bridges[0].boot
    assert boot is not None and boot.https == BootHttpsConfig(Path("/b/c.pem"), Path("/b/c.key"))
    for https, message in (({"cert": "/b/c.pem"}, "needs the boot certificate"),
                           ({"cert": "c", "key": "k", "port": 8080}, "the plain HTTP one"),
                           ({"cert": "c", "key": "k", "colour": 1}, "unknown key")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            parse_config({"bridges": [{"name": "br0", "boot": {"https": https}}]})


def test_the_boot_certificate_must_name_the_address_served(tmp_path: Path, boot_ca: Path) -> None:
    elsewhere = pki.issue(boot_ca, "node-b-boot", tmp_path / "b", server_names=("10.9.9.9",))
    here = pki.issue(boot_ca, "node-a-boot", tmp_path / "a", server_names=(HOLDER,))

    def netboot(pair: pki.IssuedPair) -> Netboot:
        boot = BootServiceConfig(https=BootHttpsConfig(pair.cert, pair.key))
        return Netboot("br0", boot, tmp_path / "state", ImageStore(tmp_path / "s"), lambda: "v")

    with pytest.raises(ConfigError, match=r"does not name 127\.0\.0\.1") as err:
        netboot(elsewhere)._boot_tls((HOLDER,))
    assert err.value.hint is not None and f"--server {HOLDER}" in err.value.hint
    assert isinstance(netboot(here)._boot_tls((HOLDER,)), ssl.SSLContext)


def test_an_rsa_ca_issues_rsa_certificates_and_the_fleet_ca_stays_ecdsa(
    tmp_path: Path, boot_ca: Path
) -> None:
    boot = pki.issue(boot_ca, "node-a-boot", tmp_path / "boot", server_names=(HOLDER,))
    cert = x509.load_pem_x509_certificate(boot.cert.read_bytes())
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    pki.init_ca(tmp_path / "fleet")
    api = pki.issue(tmp_path / "fleet", "node-a", tmp_path / "api", server_names=(HOLDER,))
    fleet = x509.load_pem_x509_certificate(api.cert.read_bytes())
    assert isinstance(fleet.public_key(), ec.EllipticCurvePublicKey)
