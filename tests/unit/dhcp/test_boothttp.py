"""The boot HTTP service (aiohttp's test server on loopback) and the pxe/ profiles."""

from __future__ import annotations

import ipaddress
import os
import struct
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hatchery.boothttp.app import BootHttpConfig, make_app
from hatchery.boothttp.profiles import Profiles
from hatchery.errors import ConfigError
from hatchery.ra import Managed, build_router_advertisement, is_router_solicitation

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "artefacts"
    (root / "hypervisor" / "current").mkdir(parents=True)
    (root / "hypervisor" / "current" / "vmlinuz").write_bytes(bytes(range(256)) * 64)
    (root / "hypervisor" / "current" / "initrd").write_bytes(b"initrd")
    (tmp_path / "secret").write_text("outside the root")
    os.symlink(tmp_path / "secret", root / "escape")
    return root


def repo_profiles() -> Profiles:
    return Profiles.load(REPO / "pxe" / "profiles.yaml")


@pytest.fixture
async def client(tree: Path):
    app = make_app(BootHttpConfig(tree, repo_profiles(), ipxe_dir=Path("/usr/lib/ipxe")))
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_script_for_a_mac_uses_the_default_profile(client) -> None:
    resp = await client.get("/boot/ipxe?mac=52-54-00-AA-BB-CC")
    assert resp.status == 200
    text = await resp.text()
    host = f"{client.host}:{client.port}"
    assert text.startswith("#!ipxe\n")
    assert f"kernel http://{host}/artefacts/hypervisor/current/vmlinuz initrd=initrd" in text
    assert f"initrd --name initrd http://{host}/artefacts/hypervisor/current/initrd" in text
    assert "hatchery.role=hypervisor" in text
    assert "{{" not in text
    assert "${net0/mac}" in text  # iPXE's own settings are left for iPXE


async def test_bad_mac_is_a_400(client) -> None:
    resp = await client.get("/boot/ipxe?mac=../../etc")
    assert resp.status == 400


async def test_unknown_mac_without_default_is_refused_with_a_reason(tree: Path) -> None:
    profiles = repo_profiles()
    strict = Profiles(profiles.profiles, profiles.machines, default=None)
    async with TestClient(TestServer(make_app(BootHttpConfig(tree, strict)))) as c:
        resp = await c.get("/boot/ipxe?mac=52:54:00:aa:bb:cc")
        assert resp.status == 404
        assert "no boot profile for 52:54:00:aa:bb:cc" in await resp.text()


async def test_artefact_range_request(client, tree: Path) -> None:
    resp = await client.get("/artefacts/hypervisor/current/vmlinuz",
                            headers={"Range": "bytes=256-511"})  # fmt: skip
    assert resp.status == 206
    assert await resp.read() == bytes(range(256))
    assert resp.headers["Content-Range"] == "bytes 256-511/16384"


@pytest.mark.parametrize(
    "path",
    [
        "/artefacts/../secret",
        "/artefacts/%2e%2e/secret",
        "/artefacts/hypervisor/%2e%2e/%2e%2e/secret",
        "/artefacts/escape",  # a symlink out of the root
        "/artefacts//etc/passwd",
        "/artefacts/hypervisor",  # a directory
        "/ipxe/..%2fsecret",
        "/ipxe/.hidden",
    ],
)
async def test_no_path_leaves_the_root(client, path: str) -> None:
    resp = await client.get(path)
    assert resp.status in (400, 403, 404), path
    assert "outside the root" not in await resp.text()


async def test_ipxe_binaries_are_served_for_http_boot(client) -> None:
    if not Path("/usr/lib/ipxe/ipxe.efi").exists():
        pytest.skip("Debian's ipxe package is not installed")
    resp = await client.get("/ipxe/ipxe.efi")
    assert resp.status == 200
    assert (await resp.read())[:2] == b"MZ"  # a PE/COFF EFI binary


def test_profiles_precedence_machine_group_default(tmp_path: Path) -> None:
    (tmp_path / "t.ipxe").write_text("#!ipxe\nkernel {{kernel_url}} {{cmdline}}\n")
    (tmp_path / "p.yaml").write_text(
        "default: a\n"
        "profiles:\n"
        "  a: {image: img/a, template: t.ipxe}\n"
        "  b: {image: img/b, template: t.ipxe, cmdline: quiet}\n"
        "  c: {image: img/c, template: t.ipxe}\n"
        "groups:\n  g: {profile: b, macs: ['52:54:00:00:00:01', '52:54:00:00:00:02']}\n"
        "machines:\n  '52:54:00:00:00:02': c\n"
    )
    p = Profiles.load(tmp_path / "p.yaml")
    assert p.for_mac("52:54:00:00:00:01").name == "b"  # type: ignore[union-attr]
    assert p.for_mac("52:54:00:00:00:02").name == "c"  # type: ignore[union-attr]
    assert p.for_mac("52:54:00:00:00:03").name == "a"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ("profiles: {a: {image: x, template: t.ipxe}}\ndefault: nope\n", "default: no profile"),
        ("profiles: {a: {template: t.ipxe}}\n", "profiles.a.image: required"),
        ("profiles: {a: {image: ../x, template: t.ipxe}}\n", "without '..'"),
        ("profiles: {a: {image: x, template: bad.ipxe}}\n", "unknown placeholder"),
        ("profiles: {a: {image: x, template: t.ipxe, colour: red}}\n", "colour: unknown key"),
        ("profiles: {a: {image: x, template: t.ipxe}}\nmachines: {zz: a}\n", "not a MAC"),
    ],
)
def test_bad_profiles_fail_at_load_with_the_key(tmp_path: Path, doc: str, error: str) -> None:
    (tmp_path / "t.ipxe").write_text("#!ipxe\nkernel {{kernel_url}}\n")
    (tmp_path / "bad.ipxe").write_text("#!ipxe\nkernel {{kernal_url}}\n")
    (tmp_path / "p.yaml").write_text(doc)
    with pytest.raises(ConfigError, match=error):
        Profiles.load(tmp_path / "p.yaml")


def test_router_advertisement_says_no_router_no_prefix() -> None:
    ra = build_router_advertisement(bytes.fromhex("525400123456"))
    assert ra[0] == 134 and ra[1] == 0  # ICMPv6 RA, code 0 (RFC 4861 4.2)
    assert ra[5] == 0  # M and O flags clear: no DHCPv6
    assert ra[6:8] == b"\x00\x00"  # router lifetime 0: not a default router
    assert ra[16:] == bytes((1, 1)) + bytes.fromhex("525400123456")  # only the source LLA
    assert is_router_solicitation(bytes((133, 0, 0, 0, 0, 0, 0, 0)))
    assert not is_router_solicitation(ra)


def test_managed_router_advertisement_sends_hosts_to_dhcpv6() -> None:
    """IPv6 births: M=1 and O=1, the birth prefix on-link but not autonomous (A=0), and
    router lifetime 0 unless this node routes (RFC 4861 4.2, 4.6.2)."""
    prefix = ipaddress.IPv6Network("fd42:6b1:0:1::/64")
    mac = bytes.fromhex("525400123456")
    ra = build_router_advertisement(mac, managed=Managed(prefix, 0, 3600))
    assert ra[5] == 0xC0  # M and O
    assert ra[6:8] == b"\x00\x00"
    assert ra[16:24] == bytes((1, 1)) + mac
    pio = ra[24:]
    assert len(pio) == 32 and pio[0] == 3 and pio[1] == 4  # Prefix Information, 32 bytes
    assert pio[2] == 64 and pio[3] == 0x80  # /64, L=1, A=0
    assert struct.unpack("!II", pio[4:12]) == (3600, 3600)
    assert pio[16:] == prefix.network_address.packed
    routed = build_router_advertisement(mac, managed=Managed(prefix, 1800))
    assert struct.unpack("!H", routed[6:8]) == (1800,)
    with pytest.raises(ValueError, match="router lifetime"):
        build_router_advertisement(mac, managed=Managed(prefix, 9001))
