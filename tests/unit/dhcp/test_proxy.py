"""proxyDHCP (PXE 2.1 section 2.2, RFC 4578): boot answers only, never an address.

The golden requests are real captures (QEMU's iPXE ROM, OVMF's PXE); the answers are
compared with checked-in text (``golden/proxy-*.txt``, ``describe`` form). Hypothesis then
throws arbitrary requests at both ports: no reply ever carries yiaddr other than 0.0.0.0 or
a lease option. The boot HTTP service, given the proxy's observed addresses, hands a
script and its seed token only to the address the iPXE client came from on port 4011.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery.boothttp.app import BootHttpConfig, make_app
from hatchery.boothttp.profiles import Profiles
from hatchery.boothttp.seeds import SeedFolder
from hatchery.config import BootServiceConfig, DhcpMode
from hatchery.dhcp.packet import (
    ZERO_IP,
    DhcpPacket,
    MessageType,
    Op,
    Opt,
    describe,
    opt_ip,
    opt_str,
    opt_u8,
    parse_suboptions,
)
from hatchery.dhcp.proxy import (
    PXE_PORT,
    ProxyBindings,
    ProxyConfig,
    ProxyResponder,
    gives_no_address,
)
from hatchery.dhcp.responder import BootConfig
from hatchery.dhcp.server import ProxyProtocol
from hatchery.images.store import ImageStore
from hatchery.netboot import Netboot, ProxyAddressHolders
from hatchery.sealing import SeedKey
from tests.conftest import FUZZ_EXAMPLES
from tests.support.boot_http import TOKEN_URL, get, post

IP = ipaddress.IPv4Address
REPO = Path(__file__).resolve().parents[3]
SEED = b"hatchery/tls/agent.key: the node's private key"
GOLDEN = Path(__file__).parent / "golden"
SERVER = IP("10.9.0.1")
NOW = 1_000_000.0
IPXE_MAC = "52:54:00:5e:00:01"
SITE_ADDRESS = IP("10.9.0.150")  # what the site's DHCP server gave the client
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def golden(name: str) -> DhcpPacket:
    return DhcpPacket.decode(bytes.fromhex((GOLDEN / f"{name}.hex").read_text().replace("\n", "")))


def responder(bindings: ProxyBindings | None = None) -> ProxyResponder:
    return ProxyResponder(ProxyConfig(SERVER, BootConfig("http://10.9.0.1:8080")), bindings)


def proxy_request(discover: DhcpPacket, ciaddr: ipaddress.IPv4Address) -> DhcpPacket:
    """What the client sends to 4011 once it has the site's address (PXE 2.1 2.2.5)."""
    options = [o for o in discover.options if o.code != Opt.MESSAGE_TYPE]
    return dataclasses.replace(
        discover, ciaddr=ciaddr,
        options=(opt_u8(Opt.MESSAGE_TYPE, MessageType.REQUEST), opt_ip(Opt.SERVER_ID, SERVER),
                 *options),
    )  # fmt: skip


def check_golden(name: str, reply: DhcpPacket | None) -> None:
    assert reply is not None
    # the reply must survive its own encoding, as clients see it
    assert describe(DhcpPacket.decode(reply.encode())) == describe(reply)
    assert describe(reply) + "\n" == (GOLDEN / f"{name}.txt").read_text()


def test_ipxe_discover_gets_a_proxy_offer_without_address_or_boot_file() -> None:
    """No boot file on 67: iPXE must come back to 4011 from the site's address (its
    ``dhcp_has_pxeopts`` is false, so it sends a ProxyDHCPREQUEST)."""
    offer = responder().discover(golden("ipxe-bios-discover"), NOW)
    check_golden("proxy-ipxe-offer", offer)
    assert offer is not None
    assert offer.yiaddr == ZERO_IP and offer.bootfile == b""
    assert offer.vendor_class == b"PXEClient" and offer.server_id == SERVER
    assert offer.get(Opt.LEASE_TIME) is None


def test_firmware_pxe_discover_gets_the_ipxe_binary_over_tftp() -> None:
    offer = responder().discover(golden("ovmf-pxeclient-discover"), NOW)
    check_golden("proxy-ovmf-offer", offer)
    assert offer is not None
    assert (offer.yiaddr, offer.siaddr, offer.bootfile) == (ZERO_IP, SERVER, b"ipxe.efi")
    # PXE 2.1 table 2-1: option 43, PXE_DISCOVERY_CONTROL = bit 3 (use the boot file)
    vendor = offer.get(Opt.VENDOR_SPECIFIC)
    assert vendor is not None
    assert [(s.code, s.data) for s in parse_suboptions(43, vendor)] == [(6, b"\x08")]


def test_ipxe_request_on_4011_gets_its_script_url_and_binds_its_address() -> None:
    bindings = ProxyBindings()
    request = proxy_request(golden("ipxe-bios-discover"), SITE_ADDRESS)
    ack = responder(bindings).request(request, SITE_ADDRESS, NOW)
    check_golden("proxy-ipxe-ack", ack)
    assert ack is not None
    assert ack.bootfile == f"http://10.9.0.1:8080/boot/ipxe?mac={IPXE_MAC}".encode()
    assert ack.siaddr == SERVER  # iPXE takes a proxy answer only with next-server and file
    assert (ack.yiaddr, ack.ciaddr) == (ZERO_IP, SITE_ADDRESS)
    assert ack.get(Opt.IPXE) is None  # no "skip proxyDHCP" in the proxy's own answer
    assert bindings.address(IPXE_MAC, NOW) == SITE_ADDRESS


def test_firmware_request_on_4011_gets_its_binary_and_binds_nothing() -> None:
    bindings = ProxyBindings()
    request = proxy_request(golden("ovmf-pxeclient-discover"), SITE_ADDRESS)
    ack = responder(bindings).request(request, SITE_ADDRESS, NOW)
    assert ack is not None and ack.message_type == MessageType.ACK
    assert (ack.yiaddr, ack.bootfile) == (ZERO_IP, b"ipxe.efi")
    assert len(bindings) == 0


@pytest.mark.parametrize("ciaddr", [ZERO_IP, IP("10.9.0.151")])
def test_a_4011_request_not_from_its_ciaddr_is_ignored(ciaddr: ipaddress.IPv4Address) -> None:
    """A forged claim (ciaddr of someone else) binds nothing and gets nothing."""
    bindings = ProxyBindings()
    request = proxy_request(golden("ipxe-bios-discover"), ciaddr)
    assert responder(bindings).request(request, SITE_ADDRESS, NOW) is None
    assert len(bindings) == 0


def test_a_4011_request_for_another_proxy_is_ignored() -> None:
    request = proxy_request(golden("ipxe-bios-discover"), SITE_ADDRESS)
    other = dataclasses.replace(request, options=tuple(
        opt_ip(Opt.SERVER_ID, IP("10.9.0.2")) if o.code == Opt.SERVER_ID else o
        for o in request.options))  # fmt: skip
    assert responder().request(other, SITE_ADDRESS, NOW) is None


@pytest.mark.parametrize("name", ["udhcpc-discover", "udhcpc-request", "ovmf-httpclient-discover"])
def test_clients_that_are_not_pxe_are_never_answered(name: str) -> None:
    packet = golden(name)
    proxy = responder()
    assert proxy.discover(packet, NOW) is None
    as_4011 = dataclasses.replace(packet, ciaddr=SITE_ADDRESS)
    assert proxy.request(as_4011, SITE_ADDRESS, NOW) is None


def test_requests_on_67_belong_to_the_site_server() -> None:
    """The REQUEST that takes the site's offer is broadcast; the proxy stays silent."""
    discover = golden("ipxe-bios-discover")
    request = proxy_request(discover, ZERO_IP)
    assert responder().discover(request, NOW) is None


def test_the_bindings_stay_bounded_and_expire() -> None:
    bindings = ProxyBindings(hold=10.0, max_held=3)
    for i in range(10):
        bindings.observe(f"52:54:00:00:00:{i:02x}", IP(f"10.9.0.{i + 1}"), NOW)
    assert len(bindings) == 3
    assert bindings.address("52:54:00:00:00:09", NOW) == IP("10.9.0.10")
    assert bindings.address("52:54:00:00:00:00", NOW) is None
    assert bindings.address("52:54:00:00:00:09", NOW + 10.0) is None


# --- no address, ever -------------------------------------------------------------------------

MACS = st.sampled_from([IPXE_MAC, "52:54:00:5e:00:09", "01:00:5e:00:00:01"])
ADDRESSES = st.sampled_from([ZERO_IP, SITE_ADDRESS, SERVER, IP("255.255.255.255")])
VENDOR = st.sampled_from([b"PXEClient", b"PXEClient:Arch:00007:UNDI:003000", b"HTTPClient",
                          b"MSFT 5.0", b"PXE"])  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> DhcpPacket:
    options = [opt_u8(Opt.MESSAGE_TYPE, draw(st.sampled_from(list(MessageType))))]
    if draw(st.booleans()):
        options.append(opt_str(Opt.VENDOR_CLASS, draw(VENDOR)))
    if draw(st.booleans()):
        options.append(opt_str(Opt.USER_CLASS, b"iPXE"))
    if draw(st.booleans()):
        options.append(opt_ip(Opt.SERVER_ID, draw(ADDRESSES)))
    if draw(st.booleans()):
        options.append(opt_ip(Opt.REQUESTED_IP, draw(ADDRESSES)))
    if draw(st.booleans()):
        arch = draw(st.sampled_from([0, 6, 7, 9, 11, 16, 19]))
        options.append(opt_str(Opt.CLIENT_ARCH, arch.to_bytes(2, "big")))
    return DhcpPacket(
        op=draw(st.sampled_from(list(Op))), xid=draw(st.integers(0, 2**32 - 1)),
        chaddr=bytes.fromhex(draw(MACS).replace(":", "")),
        flags=draw(st.sampled_from([0, 0x8000])), ciaddr=draw(ADDRESSES),
        yiaddr=draw(ADDRESSES), giaddr=draw(st.sampled_from([ZERO_IP, IP("10.9.1.1")])),
        options=tuple(options),
    )  # fmt: skip


@FUZZ
@given(requests(), ADDRESSES, st.booleans())
def test_proxy_mode_never_gives_an_address(
    request: DhcpPacket, source: ipaddress.IPv4Address, tftp: bool
) -> None:
    proxy = ProxyResponder(ProxyConfig(SERVER, BootConfig("http://10.9.0.1:8080", tftp)))
    for reply in (proxy.discover(request, NOW), proxy.request(request, source, NOW)):
        if reply is not None:
            assert reply.yiaddr == ZERO_IP
            assert gives_no_address(reply)
            assert reply.vendor_class == b"PXEClient"
            assert (request.vendor_class or b"").startswith(b"PXEClient")


@FUZZ
@given(st.binary(max_size=600))
def test_garbage_on_either_port_gets_nothing(data: bytes) -> None:
    for port in (67, PXE_PORT):
        protocol, sent = recording(port)
        protocol.datagram_received(data, ("10.9.0.150", 68))
        assert protocol.failed == 0
        for raw, _ in sent:
            assert DhcpPacket.decode(raw).yiaddr == ZERO_IP


# --- the transport ----------------------------------------------------------------------------


class RecordingTransport(list[tuple[bytes, tuple[str, int]]]):
    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.append((data, addr))


def recording(
    port: int, proxy: ProxyResponder | None = None
) -> tuple[ProxyProtocol, RecordingTransport]:
    protocol = ProxyProtocol(proxy or responder(), port, clock=lambda: NOW)
    transport = RecordingTransport()
    protocol.transport = transport  # type: ignore[assignment]
    return protocol, transport


def test_4011_answers_go_back_to_the_source_from_4011_and_67_offers_are_broadcast() -> None:
    protocol, sent = recording(PXE_PORT)
    request = proxy_request(golden("ipxe-bios-discover"), SITE_ADDRESS)
    protocol.datagram_received(request.encode(), (str(SITE_ADDRESS), 68))
    assert [addr for _, addr in sent] == [(str(SITE_ADDRESS), 68)]
    protocol, sent = recording(67)
    protocol.datagram_received(golden("ipxe-bios-discover").encode(), ("0.0.0.0", 68))
    assert [addr for _, addr in sent] == [("255.255.255.255", 68)]


class Broken(ProxyResponder):
    """A responder with a bug that would give an address: the transport must not send it."""

    def discover(self, request: DhcpPacket, now: float) -> DhcpPacket | None:
        reply = super().discover(request, now)
        assert reply is not None
        return dataclasses.replace(reply, yiaddr=IP("10.9.0.99"))


def test_the_transport_never_sends_an_address_whatever_the_responder_says() -> None:
    broken = Broken(ProxyConfig(SERVER, BootConfig("http://10.9.0.1:8080")))
    protocol, sent = recording(67, broken)
    protocol.datagram_received(golden("ipxe-bios-discover").encode(), ("0.0.0.0", 68))
    assert sent == [] and protocol.refused == 1


# --- the boot HTTP service trusts only the observed address ------------------------------------

HOLDER, STRANGER = IP("127.0.0.1"), IP("127.0.0.2")


async def test_script_and_seed_go_only_to_the_address_seen_on_4011(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir(mode=0o700)
    (seeds / f"{IPXE_MAC}.tar").write_bytes(SEED)
    root = tmp_path / "artefacts"
    root.mkdir()
    bindings = ProxyBindings()
    config = BootHttpConfig(root, Profiles.load(REPO / "pxe" / "profiles.yaml"),
                            births=ProxyAddressHolders(bindings),
                            seeds=SeedFolder(seeds))  # fmt: skip
    async with TestServer(make_app(config), host=str(HOLDER)) as server:
        path = f"/boot/ipxe?mac={IPXE_MAC}"
        assert (await get(server, path)).status == 404  # nobody seen on 4011 yet
        request = proxy_request(golden("ipxe-bios-discover"), HOLDER)
        proxy = responder(bindings)
        assert proxy.request(request, HOLDER, time.time()) is not None
        assert (await get(server, path, source=str(STRANGER))).status == 404
        script = await get(server, path)
        assert script.status == 200
        [(_, token)] = TOKEN_URL.findall(script.body.decode())
        key = SeedKey()
        seed_path = f"/seed/{token}"
        assert (await post(server, seed_path, key.public, source=str(STRANGER))).status == 404
        first = await post(server, seed_path, key.public)
        assert first.status == 200 and key.open(first.body) == SEED
        assert (await post(server, seed_path, key.public)).status == 404  # single use


def test_netboot_in_proxy_mode_shares_its_bindings_with_boot_http(tmp_path: Path) -> None:
    boot = BootServiceConfig(dhcp=DhcpMode.PROXY, seeds=tmp_path / "seeds")
    netboot = Netboot("br0", boot, tmp_path / "state", ImageStore(tmp_path / "store"),
                      lambda: "v1")  # fmt: skip
    bindings = netboot.proxy_bindings()
    assert bindings is not None and netboot.births() is None
    holders = netboot.http_config().births
    assert isinstance(holders, ProxyAddressHolders) and holders.bindings is bindings
