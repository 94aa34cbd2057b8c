"""The DHCP responder's decisions (RFC 2131 4.3), boot answers, and lease persistence."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import random
from pathlib import Path

import pytest

from hatchery.dhcp.leases import BirthLeases, Lease, StaticLeases
from hatchery.dhcp.packet import (
    ZERO_IP,
    DhcpPacket,
    IpxeOpt,
    MessageType,
    Op,
    Opt,
    Option,
    opt_ip,
    opt_str,
    opt_u8,
    parse_suboptions,
)
from hatchery.dhcp.responder import BootConfig, DhcpConfig, Responder, destination
from hatchery.dhcp.server import DhcpProtocol

IP = ipaddress.IPv4Address
GOLDEN = Path(__file__).parent / "golden"
SERVER = IP("10.9.0.1")
NOW = 1_000_000.0
VM_MAC = "52:54:00:00:00:10"
BOOT = BootConfig("http://10.9.0.1:8080")


def golden(name: str) -> DhcpPacket:
    return DhcpPacket.decode(bytes.fromhex((GOLDEN / f"{name}.hex").read_text().replace("\n", "")))


def config(**changes: object) -> DhcpConfig:
    base = DhcpConfig(SERVER, ipaddress.IPv4Network("10.9.0.0/24"), IP("10.9.0.254"),
                      (IP("192.0.2.53"),), "example.test", 1200, BOOT)  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def responder(births: BirthLeases | None = None, **changes: object) -> Responder:
    static = StaticLeases({VM_MAC: Lease(VM_MAC, IP("10.9.0.10"), "vm10")})
    return Responder(config(**changes), static, births)


def births(path: Path | None = None, size: int = 10) -> BirthLeases:
    return BirthLeases(IP("10.9.0.100"), IP("10.9.0.100") + size - 1, path)


def msg(kind: MessageType, mac: str = VM_MAC, *opts: Option, **fields: object) -> DhcpPacket:
    return DhcpPacket(Op.BOOTREQUEST, 0x1234, bytes.fromhex(mac.replace(":", "")),
                      options=(opt_u8(Opt.MESSAGE_TYPE, kind), *opts), **fields)  # type: ignore[arg-type]  # fmt: skip


def boot_msg(kind: MessageType, mac: str, *opts: Option) -> DhcpPacket:
    """A message from a firmware PXE client: what the birth range answers."""
    return msg(kind, mac, opt_str(Opt.VENDOR_CLASS, "PXEClient:Arch:00000:UNDI:002001"), *opts)


def with_mac(packet: DhcpPacket, mac: str) -> DhcpPacket:
    return dataclasses.replace(packet, chaddr=bytes.fromhex(mac.replace(":", "")))


def test_static_discover_gets_an_offer_with_the_network_settings() -> None:
    reply = responder().handle(msg(MessageType.DISCOVER), NOW)
    assert reply is not None
    assert reply.op == Op.BOOTREPLY and reply.xid == 0x1234
    assert reply.message_type == MessageType.OFFER
    assert reply.yiaddr == IP("10.9.0.10")
    assert reply.server_id == SERVER
    assert reply.subnet_mask == IP("255.255.255.0")
    assert reply.routers == (IP("10.9.0.254"),)
    assert reply.dns_servers == (IP("192.0.2.53"),)
    assert reply.lease_time == 1200
    assert reply.hostname == "vm10"
    assert reply.get(Opt.DOMAIN_NAME) == b"example.test"
    assert reply.get(Opt.BOOTFILE) is None  # VMs are not network-booted unless lease.boot


def test_unknown_mac_is_ignored_without_birthing() -> None:
    assert responder().handle(msg(MessageType.DISCOVER, "52:54:00:99:99:99"), NOW) is None


def test_ipxe_gets_its_script_url_and_the_no_proxydhcp_option() -> None:
    reply = responder(births()).handle(golden("ipxe-bios-discover"), NOW)
    assert reply is not None and reply.message_type == MessageType.OFFER
    url = b"http://10.9.0.1:8080/boot/ipxe?mac=52:54:00:5e:00:01"
    assert reply.get(Opt.BOOTFILE) == url and reply.file == url
    encap = reply.get(Opt.IPXE)
    assert encap is not None
    assert parse_suboptions(175, encap) == (Option(IpxeOpt.NO_PXEDHCP, b"\x01"),)
    assert reply.siaddr == SERVER
    assert reply.yiaddr == IP("10.9.0.100")


def test_uefi_pxe_rom_gets_ipxe_efi_over_tftp() -> None:
    reply = responder(births()).handle(golden("ovmf-pxeclient-discover"), NOW)
    assert reply is not None
    assert reply.file == b"ipxe.efi" and reply.get(Opt.BOOTFILE) == b"ipxe.efi"
    assert reply.get(Opt.TFTP_SERVER) == b"10.9.0.1"
    assert reply.siaddr == SERVER


def test_bios_pxe_rom_gets_undionly_and_another_tftp_server_if_configured() -> None:
    boot = dataclasses.replace(BOOT, tftp_server=IP("10.9.0.2"))
    request = msg(MessageType.DISCOVER, "52:54:00:00:00:77",
                  opt_str(Opt.VENDOR_CLASS, "PXEClient:Arch:00000:UNDI:002001"),
                  Option(Opt.CLIENT_ARCH, b"\x00\x00"))  # fmt: skip
    reply = responder(births(), boot=boot).handle(request, NOW)
    assert reply is not None
    assert reply.file == b"undionly.kpxe" and reply.siaddr == IP("10.9.0.2")


def test_pxe_rom_gets_an_address_only_when_there_is_no_tftp() -> None:
    boot = dataclasses.replace(BOOT, tftp=False)
    reply = responder(births(), boot=boot).handle(golden("ovmf-pxeclient-discover"), NOW)
    assert reply is not None and reply.yiaddr != ZERO_IP
    assert reply.file == b"" and reply.get(Opt.BOOTFILE) is None


def test_uefi_http_boot_gets_an_http_url_and_the_vendor_class_echoed() -> None:
    reply = responder(births()).handle(golden("ovmf-httpclient-discover"), NOW)
    assert reply is not None
    assert reply.get(Opt.BOOTFILE) == b"http://10.9.0.1:8080/ipxe/ipxe.efi"
    assert reply.vendor_class == b"HTTPClient"


def test_static_lease_with_boot_gets_boot_answers() -> None:
    static = StaticLeases({"52:54:00:5e:00:01": Lease("52:54:00:5e:00:01", IP("10.9.0.20"),
                                                      boot=True)})  # fmt: skip
    reply = Responder(config(), static).handle(golden("ipxe-bios-discover"), NOW)
    assert reply is not None and reply.yiaddr == IP("10.9.0.20")
    assert reply.get(Opt.BOOTFILE) is not None


def test_request_for_another_server_is_ignored_rfc2131_4_3_2() -> None:
    request = msg(MessageType.REQUEST, VM_MAC, opt_ip(Opt.SERVER_ID, IP("10.9.0.2")),
                  opt_ip(Opt.REQUESTED_IP, IP("10.9.0.10")))  # fmt: skip
    assert responder().handle(request, NOW) is None


def test_selecting_request_for_the_right_address_is_acked() -> None:
    request = msg(MessageType.REQUEST, VM_MAC, opt_ip(Opt.SERVER_ID, SERVER),
                  opt_ip(Opt.REQUESTED_IP, IP("10.9.0.10")))  # fmt: skip
    reply = responder().handle(request, NOW)
    assert reply is not None and reply.message_type == MessageType.ACK
    assert reply.yiaddr == IP("10.9.0.10")


@pytest.mark.parametrize("server_id", [True, False], ids=["selecting", "init-reboot"])
def test_request_for_a_wrong_address_is_naked_and_broadcast(server_id: bool) -> None:
    opts = [opt_ip(Opt.REQUESTED_IP, IP("10.9.0.11"))]
    if server_id:
        opts.append(opt_ip(Opt.SERVER_ID, SERVER))
    request = msg(MessageType.REQUEST, VM_MAC, *opts)
    reply = responder().handle(request, NOW)
    assert reply is not None and reply.message_type == MessageType.NAK
    assert reply.yiaddr == ZERO_IP and reply.lease_time is None
    assert destination(request, reply) == ("255.255.255.255", 68)


def test_renewing_client_is_acked_by_unicast() -> None:
    request = msg(MessageType.REQUEST, VM_MAC, ciaddr=IP("10.9.0.10"))
    reply = responder().handle(request, NOW)
    assert reply is not None and reply.message_type == MessageType.ACK
    assert destination(request, reply) == ("10.9.0.10", 68)


def test_relay_gets_the_reply() -> None:
    request = msg(MessageType.DISCOVER, VM_MAC, giaddr=IP("10.9.5.1"))
    reply = responder().handle(request, NOW)
    assert reply is not None and destination(request, reply) == ("10.9.5.1", 67)


class DiskCheckingTransport:
    """Records each reply with the birth leases on disk at the moment it was sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sent: list[tuple[DhcpPacket, list[object]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        on_disk = json.loads(self.path.read_text())["leases"] if self.path.exists() else []
        self.sent.append((DhcpPacket.decode(data), on_disk))


async def test_birthing_discover_request_ack_persists_before_the_ack(tmp_path: Path) -> None:
    path = tmp_path / "births.json"
    r = responder(births(path))
    protocol = DhcpProtocol(r, clock=lambda: NOW)
    transport = DiskCheckingTransport(path)
    protocol.transport = transport  # type: ignore[assignment]
    mac = "52:54:00:aa:00:01"
    pxe = opt_str(Opt.VENDOR_CLASS, "PXEClient:Arch:00000:UNDI:002001")
    protocol.datagram_received(msg(MessageType.DISCOVER, mac, pxe).encode(), ("0.0.0.0", 68))
    [(offer, _)] = transport.sent  # an offer changes nothing on disk: answered at once
    assert offer.message_type == MessageType.OFFER and offer.yiaddr == IP("10.9.0.100")
    assert not path.exists()  # offers are held in memory only
    request = msg(MessageType.REQUEST, mac, opt_ip(Opt.SERVER_ID, SERVER),
                  opt_ip(Opt.REQUESTED_IP, offer.yiaddr))  # fmt: skip
    protocol.datagram_received(request.encode(), ("0.0.0.0", 68))
    assert len(transport.sent) == 1, "the ACK waits for its lease to be written (off the loop)"
    for _ in range(200):
        if len(transport.sent) == 2:
            break
        await asyncio.sleep(0.01)
    [_, (ack, on_disk)] = transport.sent
    assert ack.message_type == MessageType.ACK
    assert on_disk == [{"mac": mac, "ip": "10.9.0.100", "expires": NOW + 1200}]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    # a restarted server knows the client: INIT-REBOOT for its address is ACKed
    again = responder(births(path))
    reboot = msg(MessageType.REQUEST, mac, opt_ip(Opt.REQUESTED_IP, IP("10.9.0.100")))
    reply = again.handle(reboot, NOW + 10)
    assert reply is not None and reply.message_type == MessageType.ACK
    # and its next DISCOVER gets the same address back
    offer2 = again.handle(msg(MessageType.DISCOVER, mac), NOW + 20)
    assert offer2 is not None and offer2.yiaddr == IP("10.9.0.100")


def test_a_lease_that_cannot_be_saved_is_retried(tmp_path: Path) -> None:
    b = births(tmp_path / "state" / "births.json")
    assert b.commit("52:54:00:aa:00:02", IP("10.9.0.101"), 600, NOW) and b.unsaved
    (tmp_path / "state").write_text("a file where the folder should be")
    with pytest.raises(OSError):
        b.save()
    assert b.unsaved, "a failed write leaves the change to be written again"
    (tmp_path / "state").unlink()
    b.save()
    assert not b.unsaved and b.take_write() is None
    saved = json.loads((tmp_path / "state" / "births.json").read_text())["leases"]
    assert [lease["mac"] for lease in saved] == ["52:54:00:aa:00:02"]


def test_birthing_answers_network_boot_clients_only(tmp_path: Path) -> None:
    """A plain client we do not know is another agent's VM on this segment: no birth
    address for it. Once a machine holds a birth lease (from its PXE phase), its OS's plain
    DHCP gets the same address back."""
    r = responder(births(tmp_path / "births.json"))
    assert r.handle(msg(MessageType.DISCOVER, "52:54:00:aa:00:05"), NOW) is None
    ipxe = opt_str(Opt.USER_CLASS, "iPXE")
    offer = r.handle(msg(MessageType.DISCOVER, "52:54:00:aa:00:06", ipxe), NOW)
    assert offer is not None
    request = msg(MessageType.REQUEST, "52:54:00:aa:00:06", opt_ip(Opt.SERVER_ID, SERVER),
                  opt_ip(Opt.REQUESTED_IP, offer.yiaddr))  # fmt: skip
    assert r.handle(request, NOW) is not None
    again = r.handle(msg(MessageType.DISCOVER, "52:54:00:aa:00:06"), NOW + 5)
    assert again is not None and again.yiaddr == offer.yiaddr


def test_init_reboot_of_a_client_we_do_not_know_is_ignored() -> None:
    request = msg(MessageType.REQUEST, "52:54:00:aa:00:09",
                  opt_ip(Opt.REQUESTED_IP, IP("10.9.0.105")))  # fmt: skip
    assert responder(births()).handle(request, NOW) is None


def test_init_reboot_on_the_wrong_network_is_naked() -> None:
    request = msg(MessageType.REQUEST, "52:54:00:aa:00:09",
                  opt_ip(Opt.REQUESTED_IP, IP("192.168.1.5")))  # fmt: skip
    reply = responder(births()).handle(request, NOW)
    assert reply is not None and reply.message_type == MessageType.NAK


def test_second_node_gets_the_next_address_and_a_full_range_gets_no_offer() -> None:
    r = responder(births(size=2))
    a = r.handle(boot_msg(MessageType.DISCOVER, "52:54:00:aa:00:01"), NOW)
    b = r.handle(boot_msg(MessageType.DISCOVER, "52:54:00:aa:00:02"), NOW)
    c = r.handle(boot_msg(MessageType.DISCOVER, "52:54:00:aa:00:03"), NOW)
    assert a is not None and b is not None
    assert (a.yiaddr, b.yiaddr) == (IP("10.9.0.100"), IP("10.9.0.101"))
    assert c is None
    # offers expire: later the third node gets one
    later = r.handle(boot_msg(MessageType.DISCOVER, "52:54:00:aa:00:03"), NOW + 3600)
    assert later is not None


def _bind(r: Responder, mac: str) -> IP:
    offer = r.handle(boot_msg(MessageType.DISCOVER, mac), NOW)
    assert offer is not None
    r.handle(msg(MessageType.REQUEST, mac, opt_ip(Opt.SERVER_ID, SERVER),
                 opt_ip(Opt.REQUESTED_IP, offer.yiaddr)), NOW)  # fmt: skip
    return offer.yiaddr


def test_declined_address_is_not_offered_again() -> None:
    r = responder(births())
    mac = "52:54:00:aa:00:01"
    ip = _bind(r, mac)
    decline = msg(MessageType.DECLINE, mac, opt_ip(Opt.SERVER_ID, SERVER),
                  opt_ip(Opt.REQUESTED_IP, ip))  # fmt: skip
    assert r.handle(decline, NOW + 1) is None
    offer = r.handle(boot_msg(MessageType.DISCOVER, mac), NOW + 2)
    assert offer is not None and offer.yiaddr != ip


def test_release_frees_the_binding(tmp_path: Path) -> None:
    b = births(tmp_path / "b.json")
    r = responder(b)
    mac = "52:54:00:aa:00:01"
    ip = _bind(r, mac)
    assert b.leases()
    assert r.handle(msg(MessageType.RELEASE, mac, opt_ip(Opt.SERVER_ID, SERVER), ciaddr=ip),
                    NOW) is None  # fmt: skip
    assert b.leases() == ()
    assert b.unsaved, "deciding never writes: whoever answers writes first (the server)"
    b.save()
    assert json.loads((tmp_path / "b.json").read_text())["leases"] == []


def test_inform_gets_settings_but_no_lease_rfc2131_4_3_5() -> None:
    reply = responder().handle(msg(MessageType.INFORM, VM_MAC, ciaddr=IP("10.9.0.10")), NOW)
    assert reply is not None and reply.message_type == MessageType.ACK
    assert reply.yiaddr == ZERO_IP and reply.lease_time is None
    assert reply.routers == (IP("10.9.0.254"),)


def test_multicast_client_address_is_ignored() -> None:
    assert responder(births()).handle(msg(MessageType.DISCOVER, "01:00:5e:00:00:01"), NOW) is None


def test_server_messages_are_never_answered() -> None:
    for kind in (MessageType.OFFER, MessageType.ACK, MessageType.NAK):
        assert responder(births()).handle(msg(kind, "52:54:00:aa:00:01"), NOW) is None


def test_corrupt_lease_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "births.json"
    path.write_text("{not json")
    b = births(path)
    assert b.leases() == ()
    assert list(tmp_path.glob("births.json.corrupt-*"))


def test_static_leases_from_file(tmp_path: Path) -> None:
    f = tmp_path / "leases.yaml"
    f.write_text('"52-54-00-AA-00-01": 10.9.0.5\n"52:54:00:aa:00:02": {ip: 10.9.0.6, boot: true}\n')
    leases = StaticLeases.from_file(f)
    assert leases.lookup("52:54:00:aa:00:01") == Lease("52:54:00:aa:00:01", IP("10.9.0.5"))
    second = leases.lookup("52:54:00:aa:00:02")
    assert second is not None and second.boot


def _decline(mac: str, ip: IP) -> DhcpPacket:
    return msg(
        MessageType.DECLINE, mac, opt_ip(Opt.SERVER_ID, SERVER), opt_ip(Opt.REQUESTED_IP, ip)
    )


def test_a_decline_from_anyone_but_the_holder_is_ignored() -> None:
    """Issue 14: one forged DECLINE blocked an address for ten minutes."""
    b = births()
    r = responder(b)
    offer = r.handle(boot_msg(MessageType.DISCOVER, "52:54:00:aa:00:01"), NOW)
    assert offer is not None
    assert r.handle(_decline("52:54:00:ee:ee:ee", offer.yiaddr), NOW + 1) is None
    assert b.held == (1, 0)
    # The offer lapses unused: the address is free again, not blocked for ten minutes.
    later = r.handle(boot_msg(MessageType.DISCOVER, "52:54:00:aa:00:02"), NOW + 120)
    assert later is not None and later.yiaddr == offer.yiaddr
    # Declines of addresses nobody was given, in or out of the range, are no-ops.
    for n in range(1000):
        r.handle(_decline(f"52:54:00:ee:{n // 256:02x}:{n % 256:02x}", IP("10.9.0.100") + n), NOW)
    assert b.held[1] == 0


def test_the_holder_may_decline_its_lease() -> None:
    b = births()
    r = responder(b)
    mac = "52:54:00:aa:00:01"
    ip = _bind(r, mac)
    r.handle(_decline(mac, ip), NOW + 1)
    assert b.held[1] == 1 and b.binding(mac, NOW + 1) is None


def test_birth_tables_stay_bounded_under_a_flood_of_forged_macs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 14: offers were never pruned, so forged DISCOVERs grew the table for ever (and
    every packet scanned it). Expired offers go, the table stays within the range, and the
    "range is full" warning comes once a minute, not once a packet."""
    caplog.set_level(logging.WARNING)
    b = births(size=10)
    r = responder(b)
    n = 0
    for round_ in range(200):
        now = NOW + round_ * 61.0  # each round's offers have expired by the next
        for _ in range(30):
            n += 1
            mac = ":".join(f"{x:02x}" for x in (0x52, 0x54, 1, n >> 16, (n >> 8) & 255, n & 255))
            r.handle(boot_msg(MessageType.DISCOVER, mac), now)
        assert b.held[0] <= 10
    # A real node still gets an address once the flood's offers lapse.
    assert r.handle(boot_msg(MessageType.DISCOVER, "52:54:00:aa:00:01"), now + 61) is not None
    assert len(caplog.records) <= 200  # one per minute of the flood, not 4000


def test_offers_are_capped_even_in_a_huge_range() -> None:
    b = BirthLeases(IP("10.0.0.0"), IP("10.255.255.255"), max_held=100)
    for n in range(500):
        b.offer(f"52:54:02:00:{n >> 8:02x}:{n & 255:02x}", None, NOW)
    assert b.held[0] == 100


def test_forged_requests_do_not_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A NAK is anyone's for a forged REQUEST: one summary line, not a line per packet."""
    caplog.set_level(logging.INFO, logger="hatchery")
    r = responder(births())
    for n in range(100):
        wrong = msg(MessageType.REQUEST, VM_MAC, opt_ip(Opt.SERVER_ID, SERVER),
                    opt_ip(Opt.REQUESTED_IP, IP("10.9.0.50") + n))  # fmt: skip
        reply = r.handle(wrong, NOW + n / 10)  # 100 packets in 10 s
        assert reply is not None and reply.message_type == MessageType.NAK
    assert len(caplog.records) == 1, [rec.getMessage() for rec in caplog.records]


def test_lowest_free_address_matches_a_full_scan() -> None:
    """The freed heap and the never-given cursor give exactly what scanning the range for
    the lowest free address would, through offers, leases, releases, declines and expiry."""
    rng = random.Random(14)
    b = BirthLeases(IP("10.9.0.100"), IP("10.9.0.139"), offer_hold=60, decline_hold=600)
    macs = [f"52:54:00:bb:00:{n:02x}" for n in range(80)]
    now = NOW
    for _ in range(4000):
        now += rng.choice((0.0, 1.0, 5.0, 30.0, 200.0))
        mac = rng.choice(macs)
        action = rng.random()
        if action < 0.5:
            b._prune(now)
            fresh_client = b._leases.get(mac) is None and b._offers.get(mac) is None
            expected = next((ip for ip in (IP("10.9.0.100") + n for n in range(40))
                             if not b._taken(ip, mac, now)), None)  # fmt: skip
            got = b.offer(mac, None, now)
            if fresh_client:
                assert got == expected
        elif action < 0.6:
            b.offer(mac, IP("10.9.0.100") + rng.randrange(45), now)
        elif action < 0.8:
            held = b._offers.get(mac)
            if held is not None:
                b.commit(mac, held.ip, rng.choice((100, 1200)), now)
        elif action < 0.9:
            b.release(mac)
        else:
            held = b._offers.get(mac) or b._leases.get(mac)
            if held is not None:
                b.decline(mac, held.ip, now)


def test_discover_costs_no_scan_of_a_full_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """A /16 birth range full of leases: a flood of DISCOVERs from new MACs checks a few
    addresses each, not 65 536."""
    b = BirthLeases(IP("10.8.0.0"), IP("10.8.255.255"), max_held=100_000)
    for n in range(65536):
        mac = ":".join(f"{x:02x}" for x in (0x52, 0x54, 0, 0, n >> 8, n & 255))
        assert b.offer(mac, None, NOW) == IP("10.8.0.0") + n
        assert b.commit(mac, IP("10.8.0.0") + n, 3600, NOW)
    checks = 0
    taken = b._taken

    def counted(ip: IP, mac: str, now: float) -> bool:
        nonlocal checks
        checks += 1
        return taken(ip, mac, now)

    monkeypatch.setattr(b, "_taken", counted)
    for n in range(1000):
        assert b.offer(f"52:54:01:00:{n >> 8:02x}:{n & 255:02x}", None, NOW + 1) is None
    assert checks < 10_000
