"""Seeds over boot HTTP: never a public artefact; once, by birth token, to the lease holder.

Real aiohttp server on loopback; clients connect from 127.0.0.1 (the machine holding the
birth lease in these tests) or from 127.0.0.2 (anyone else on the boot network).
"""

from __future__ import annotations

import asyncio
import ipaddress
import stat
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from hatchery import seed as seed_module
from hatchery.boothttp.app import BootHttpConfig, BootHttpError, make_app
from hatchery.boothttp.profiles import Profiles
from hatchery.boothttp.seeds import SeedFolder
from hatchery.config import BootServiceConfig, Ipv6BootConfig
from hatchery.errors import ConfigError
from hatchery.images.store import ImageStore
from hatchery.netboot import Netboot
from hatchery.sealing import SeedKey
from hatchery.seed import SeedError, find_seed
from tests.support.boot_http import TOKEN_URL, get, post

urlopen = urllib.request.urlopen  # the real one, before a test counts its calls
REPO = Path(__file__).resolve().parents[3]
MAC = "52:54:00:b1:47:01"
HOLDER, STRANGER = "127.0.0.1", "127.0.0.2"
SEED = b"hatchery/tls/agent.key: the node's private key" * 20
KEY = SeedKey()  # the newborn's


@dataclass
class Leases:
    """The DHCP birth leases, as the boot HTTP service asks them."""

    held: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)

    def birth_address(self, mac: str, version: int) -> ipaddress.IPv4Address | None:
        held = self.held.get(mac)
        return held if held is not None and held.version == version else None


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    folder = tmp_path / "seeds"
    folder.mkdir(mode=0o700)
    (folder / f"{MAC}.tar").write_bytes(SEED)
    return folder


@pytest.fixture
def leases() -> Leases:
    return Leases({MAC: ipaddress.IPv4Address(HOLDER)})


def config(tmp_path: Path, seeds: Path, leases: Leases, ttl: float = 600.0) -> BootHttpConfig:
    root = tmp_path / "artefacts"
    (root / "hypervisor" / "current").mkdir(parents=True, exist_ok=True)
    (root / "hypervisor" / "current" / "vmlinuz").write_bytes(b"kernel")
    profiles = Profiles.load(REPO / "pxe" / "profiles.yaml")
    return BootHttpConfig(root, profiles, births=leases, seeds=SeedFolder(seeds), seed_ttl=ttl)


@pytest.fixture
async def server(tmp_path: Path, seeds: Path, leases: Leases) -> AsyncIterator[TestServer]:
    async with TestServer(make_app(config(tmp_path, seeds, leases)), host=HOLDER) as s:
        yield s


async def script_token(server: TestServer) -> tuple[str, str]:
    """The seed URL and token in the boot script the lease holder gets."""
    answer = await get(server, f"/boot/ipxe?mac={MAC}")
    assert answer.status == 200, answer.body
    assert answer.headers["Cache-Control"] == "no-store"
    found = TOKEN_URL.findall(answer.body.decode())
    assert len(found) == 1, answer.body
    return found[0]


async def test_the_holder_gets_its_seed_once(server: TestServer) -> None:
    url, token = await script_token(server)
    assert url == f"http://{HOLDER}:{server.port}/seed/{token}"
    first = await post(server, f"/seed/{token}", KEY.public)
    assert first.status == 200
    assert KEY.open(first.body) == SEED  # sealed to the key it sent
    assert SEED not in first.body
    assert first.headers["Cache-Control"] == "no-store"
    again = await post(server, f"/seed/{token}", KEY.public)
    assert (again.status, again.body) == (404, b"not found\n")


async def test_no_plain_seed_and_a_bad_key_burns_nothing(server: TestServer) -> None:
    """A GET (an older newborn, or a sniffer's replay) gets no seed at all; a body that is
    not a 32-byte key is refused before the token is looked at, so the token still works."""
    _, token = await script_token(server)
    assert (await get(server, f"/seed/{token}")).status == 405
    for body in (b"", b"x" * 31, b"x" * 33, KEY.public + b"\n"):
        bad = await post(server, f"/seed/{token}", body)
        assert bad.status == 400 and SEED not in bad.body, body
    assert KEY.open((await post(server, f"/seed/{token}", KEY.public)).body) == SEED


async def test_the_newborns_own_fetch_opens_its_sealed_seed(
    server: TestServer, tmp_path: Path
) -> None:
    """``hatchery.seed`` as the born node runs it (``find_seed``), against the real route."""
    url, _ = await script_token(server)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 hatchery.seed={url}\n")
    assert await asyncio.to_thread(find_seed, cmdline, tmp_path / "no-fw-cfg") == SEED


async def test_a_spent_token_ends_the_newborns_fetch_after_three_refusals(
    server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node rebooted by kexec keeps its first boot's command line and spent token: its
    fetch gives up after three refusals (not thirty tries), with the hint."""
    url, _ = await script_token(server)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 hatchery.seed={url}\n")
    assert await asyncio.to_thread(find_seed, cmdline, tmp_path / "no-fw-cfg") == SEED
    monkeypatch.setattr(seed_module, "FETCH_PAUSE", 0.01)
    refusals: list[int] = []

    def counted(request: urllib.request.Request, timeout: float) -> object:
        try:
            return urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            refusals.append(exc.code)
            raise

    monkeypatch.setattr(urllib.request, "urlopen", counted)
    with pytest.raises(SeedError, match="cannot fetch the seed") as failed:
        await asyncio.to_thread(find_seed, cmdline, tmp_path / "no-fw-cfg")
    assert refusals == [404] * seed_module.FETCH_REFUSALS
    assert failed.value.hint is not None and "single-use" in failed.value.hint


async def test_another_address_gets_a_404_and_leaves_the_token(server: TestServer) -> None:
    _, token = await script_token(server)
    probe = await post(server, f"/seed/{token}", KEY.public, source=STRANGER)
    assert (probe.status, probe.body) == (404, b"not found\n")
    assert (await post(server, f"/seed/{token}", KEY.public)).status == 200


async def test_refusals_look_alike(server: TestServer, leases: Leases) -> None:
    _, token = await script_token(server)
    answers = [
        await post(server, "/seed/" + "A" * 43, KEY.public),  # unknown
        await post(server, "/seed/x", KEY.public),  # malformed
        await post(server, f"/seed/{token[:-1]}", KEY.public),  # almost
        await post(server, f"/seed/{token}", KEY.public, source=STRANGER),  # another address
    ]
    leases.held.clear()  # the lease went away since the script
    answers.append(await post(server, f"/seed/{token}", KEY.public))
    assert {(a.status, a.body) for a in answers} == {(404, b"not found\n")}


async def test_an_expired_token_gets_a_404(tmp_path: Path, seeds: Path, leases: Leases) -> None:
    app = make_app(config(tmp_path, seeds, leases, ttl=0.0))
    async with TestServer(app, host=HOLDER) as server:
        _, token = await script_token(server)
        assert (await post(server, f"/seed/{token}", KEY.public)).status == 404


async def test_a_new_boot_gets_a_fresh_token(server: TestServer) -> None:
    _, first = await script_token(server)
    _, second = await script_token(server)
    assert first != second
    assert (await post(server, f"/seed/{first}", KEY.public)).status == 404
    assert (await post(server, f"/seed/{second}", KEY.public)).status == 200


async def test_the_script_goes_only_to_the_lease_holder(server: TestServer, leases: Leases) -> None:
    stranger = await get(server, f"/boot/ipxe?mac={MAC}", source=STRANGER)
    assert stranger.status == 404
    assert b"no birth lease" in stranger.body and b"seed" not in stranger.body
    leases.held.clear()
    assert (await get(server, f"/boot/ipxe?mac={MAC}")).status == 404


async def test_a_machine_without_a_seed_gets_a_script_without_one(
    server: TestServer, leases: Leases
) -> None:
    other = "52:54:00:b1:47:02"
    leases.held[other] = ipaddress.IPv4Address(HOLDER)
    answer = await get(server, f"/boot/ipxe?mac={other}")
    assert answer.status == 200
    assert b"hatchery.seed=" not in answer.body


async def test_seeds_are_not_artefacts(server: TestServer) -> None:
    for path in (f"/artefacts/seeds/{MAC}.tar", f"/artefacts/../seeds/{MAC}.tar"):
        assert (await get(server, path)).status == 404


def test_seeds_need_the_birth_leases(tmp_path: Path, seeds: Path) -> None:
    with pytest.raises(BootHttpError, match="birth leases"):
        BootHttpConfig(tmp_path, None, seeds=SeedFolder(seeds))


def test_a_profile_may_not_name_a_seed(tmp_path: Path) -> None:
    (tmp_path / "t.ipxe").write_text("#!ipxe\nkernel {{kernel_url}} {{cmdline}}\n")
    doc = (
        "default: a\nprofiles:\n  a:\n    image: x\n    template: t.ipxe\n"
        "    cmdline: hatchery.seed={{base_url}}/artefacts/seeds/{{mac}}.tar\n"
    )
    (tmp_path / "p.yaml").write_text(doc)
    with pytest.raises(ConfigError, match=r"profiles\.a\.cmdline: remove hatchery\.seed="):
        Profiles.load(tmp_path / "p.yaml")


def test_seed_folder_reads_by_mac_and_refuses_links(tmp_path: Path, seeds: Path) -> None:
    folder = SeedFolder(seeds)
    (seeds / "52-54-00-B1-47-03.tar").write_bytes(b"upper")
    assert folder.read("52:54:00:b1:47:03") == b"upper"
    (seeds / "52:54:00:b1:47:04.tar").symlink_to(seeds / f"{MAC}.tar")
    assert folder.read("52:54:00:b1:47:04") is None
    assert folder.read("52:54:00:b1:47:05") is None
    assert SeedFolder(tmp_path / "absent").read(MAC) is None


def test_seed_folder_is_made_private(tmp_path: Path) -> None:
    folder = tmp_path / "seeds"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    (folder / f"{MAC}.tar").write_bytes(SEED)
    (folder / f"{MAC}.tar").chmod(0o644)
    (tmp_path / "link").symlink_to(folder)  # /etc/hatchery is a link to /data on a node
    SeedFolder(tmp_path / "link").tighten()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / f"{MAC}.tar").stat().st_mode) == 0o600
    SeedFolder(tmp_path / "absent").tighten()  # nothing to do, no error


# --- the agent's netboot part, as it builds the service ---------------------------------------


def netboot(tmp_path: Path, seeds: Path) -> Netboot:
    """A bridge whose birth range is the loopback holder's address alone."""
    boot = BootServiceConfig(
        births_start=ipaddress.IPv4Address(HOLDER),
        births_end=ipaddress.IPv4Address(HOLDER),
        seeds=seeds,
    )
    return Netboot("br0", boot, tmp_path / "state", ImageStore(tmp_path / "store"), lambda: "v1")


async def test_the_agent_serves_seeds_by_token_only(tmp_path: Path, seeds: Path) -> None:
    nb = netboot(tmp_path, seeds)
    legacy = nb.root / "seeds"  # what agents before birth tokens left on /data, served to all
    legacy.mkdir(parents=True)
    (legacy / f"{MAC}.tar").write_bytes(SEED)
    nb.prepare()
    assert not legacy.exists()
    async with TestServer(make_app(nb.http_config()), host=HOLDER) as server:
        answer = await get(server, f"/artefacts/seeds/{MAC}.tar")
        assert answer.status == 404
        assert SEED not in answer.body
        assert (await get(server, f"/boot/ipxe?mac={MAC}")).status == 404  # no lease yet
        births = nb.births()
        assert births is not None and births is nb.births()  # one table, shared with DHCP
        assert births.commit(MAC, ipaddress.IPv4Address(HOLDER), 3600, now=time.time())
        _, token = await script_token(server)
        assert (await post(server, f"/seed/{token}", KEY.public, source=STRANGER)).status == 404
        assert KEY.open((await post(server, f"/seed/{token}", KEY.public)).body) == SEED
        assert (await post(server, f"/seed/{token}", KEY.public)).status == 404


async def test_the_agent_serves_seeds_to_the_holder_of_an_ipv6_birth_lease(
    tmp_path: Path, seeds: Path
) -> None:
    """IPv6 births: the boot HTTP service listens on the bridge's IPv6 address, and the
    script and seed go to the address that holds MAC's DHCPv6 lease (``::1`` here), not to
    the same machine's IPv4 address, which holds no lease."""
    v6 = ipaddress.IPv6Address("::1")
    boot = BootServiceConfig(
        seeds=seeds, ipv6=Ipv6BootConfig(v6, v6, ipaddress.IPv6Network("::/64"))
    )
    nb = Netboot("br0", boot, tmp_path / "state", ImageStore(tmp_path / "store"), lambda: "v1")
    nb.prepare()
    assert nb.births() is None  # no IPv4 range: an IPv6-only bridge
    async with TestServer(make_app(nb.http_config()), host="::1") as server:
        assert (await get(server, f"/boot/ipxe?mac={MAC}", source="::1")).status == 404
        births6 = nb.births6()
        assert births6 is not None and births6 is nb.births6()  # one table, shared with DHCPv6
        assert births6.commit(MAC, v6, 3600, now=time.time())
        answer = await get(server, f"/boot/ipxe?mac={MAC}", source="::1")
        assert answer.status == 200, answer.body
        ((url, token),) = TOKEN_URL.findall(answer.body.decode())
        assert url == f"http://[::1]:{server.port}/seed/{token}"
        # the newborn's own fetch (``hatchery.seed``), an IPv6 literal in its URL
        cmdline = tmp_path / "cmdline"
        cmdline.write_text(f"console=ttyS0 hatchery.seed={url}\n")
        assert await asyncio.to_thread(find_seed, cmdline, tmp_path / "no-fw-cfg") == SEED
        assert (await post(server, f"/seed/{token}", KEY.public, source="::1")).status == 404


def test_the_agent_refuses_seeds_inside_the_served_folder(tmp_path: Path) -> None:
    nb = netboot(tmp_path, tmp_path / "state" / "netboot" / "br0" / "hypervisor" / "seeds")
    with pytest.raises(ConfigError, match="boot.seeds"):
        nb.prepare()
