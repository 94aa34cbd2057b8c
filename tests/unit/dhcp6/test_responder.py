"""The DHCPv6 decisions (RFC 8415 18.3, RFC 5970), as pure functions of request and leases."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hatchery.dhcp.leases import BirthLeases6
from hatchery.dhcp6.packet import (
    Dhcp6Packet,
    IaAddress,
    IaNa,
    MessageType,
    Opt,
    Option,
    Status,
    describe,
    duid_ll,
    opt_length_prefixed,
    opt_u16s,
)
from hatchery.dhcp6.responder import (
    Boot6Config,
    ClientKind,
    Dhcp6Config,
    Responder6,
    client_kind,
    client_mac,
    eui64_mac,
)

IP6 = ipaddress.IPv6Address
PREFIX = ipaddress.IPv6Network("fd00:1::/64")
SERVER = duid_ll("52:54:00:00:00:01")
MAC = "52:54:00:12:34:56"
SOURCE = IP6("fe80::5054:ff:fe12:3456")  # MAC's EUI-64 link-local address
NOW = 1000.0
BASE = "http://[fd00:1::1]:8080"


def responder(tmp_path: Path | None = None, size: int = 16, rapid: bool = True) -> Responder6:
    births = BirthLeases6(IP6("fd00:1::100"), IP6(int(IP6("fd00:1::100")) + size - 1),
                          tmp_path / "leases.json" if tmp_path else None)  # fmt: skip
    config = Dhcp6Config(SERVER, PREFIX, 600, (IP6("fd00:1::53"),), Boot6Config(BASE),
                         rapid_commit=rapid)  # fmt: skip
    return Responder6(config, births)


def message(kind: MessageType, *options: Option, duid: bytes = duid_ll(MAC)) -> Dhcp6Packet:
    return Dhcp6Packet(kind, 0x123456, (Option(Opt.CLIENTID, duid), *options))


def ia(iaid: int = 1, *addresses: str) -> Option:
    return IaNa(iaid, options=tuple(IaAddress(IP6(a), 0, 0).encode() for a in addresses)).encode()


def addresses(reply: Dhcp6Packet) -> list[tuple[str, int]]:
    return [(str(a.address), a.valid) for i in reply.ia_na for a in i.addresses]


HTTP_BOOT = (
    opt_u16s(Opt.ORO, Opt.BOOTFILE_URL, Opt.BOOTFILE_PARAM, Opt.DNS_SERVERS),
    opt_u16s(Opt.CLIENT_ARCH, 16),
    opt_length_prefixed(
        Opt.VENDOR_CLASS, [b"HTTPClient:Arch:00016:UNDI:003000"], (343).to_bytes(4, "big")
    ),  # fmt: skip
)


def test_solicit_advertises_then_request_commits() -> None:
    r = responder()
    adv = r.handle(message(MessageType.SOLICIT, ia(7)), SOURCE, NOW)
    assert adv is not None and adv.msg_type == MessageType.ADVERTISE
    assert adv.transaction_id == 0x123456
    assert adv.server_id == SERVER and adv.client_id == duid_ll(MAC)
    assert addresses(adv) == [("fd00:1::100", 600)]
    assert adv.ia_na[0].iaid == 7 and (adv.ia_na[0].t1, adv.ia_na[0].t2) == (300, 480)
    assert adv.get(Opt.PREFERENCE) == b"\xff"
    assert adv.boot_file_url is None  # an ordinary client: an address only
    assert r.births.binding(MAC, NOW) is None  # only offered
    request = message(MessageType.REQUEST, Option(Opt.SERVERID, SERVER), ia(7, "fd00:1::100"))
    reply = r.handle(request, SOURCE, NOW + 1)
    assert reply is not None and reply.msg_type == MessageType.REPLY
    assert addresses(reply) == [("fd00:1::100", 600)]
    binding = r.births.binding(MAC, NOW + 1)
    assert binding is not None and str(binding.ip) == "fd00:1::100"


def test_rapid_commit_replies_at_once_when_asked_and_allowed() -> None:
    solicit = message(MessageType.SOLICIT, ia(), Option(Opt.RAPID_COMMIT, b""))
    reply = responder().handle(solicit, SOURCE, NOW)
    assert reply is not None and reply.msg_type == MessageType.REPLY and reply.rapid_commit
    assert addresses(reply) == [("fd00:1::100", 600)]
    advertise = responder(rapid=False).handle(solicit, SOURCE, NOW)
    assert advertise is not None and advertise.msg_type == MessageType.ADVERTISE
    assert not advertise.rapid_commit


def test_http_boot_client_gets_the_efi_url_and_httpclient_back() -> None:
    solicit = message(MessageType.SOLICIT, ia(), *HTTP_BOOT)
    assert client_kind(solicit) == ClientKind.HTTP
    adv = responder().handle(solicit, SOURCE, NOW)
    assert adv is not None and adv.boot_file_url == f"{BASE}/ipxe/ipxe.efi"
    vendor = adv.vendor_class
    assert vendor == (343, (b"HTTPClient",))  # UEFI 2.x 24.7.2.2: EDK2 needs it
    assert adv.dns_servers == (IP6("fd00:1::53"),)  # requested in its ORO


def test_boot_answers_only_to_clients_that_ask_and_that_we_can_boot() -> None:
    oro_without_url = opt_u16s(Opt.ORO, Opt.DNS_SERVERS)
    ia32 = opt_u16s(Opt.CLIENT_ARCH, 15)  # x86 UEFI HTTP: no boot for it (arm64: test_arm64)
    for options in ((oro_without_url, *HTTP_BOOT[1:]), (HTTP_BOOT[0], ia32, HTTP_BOOT[2])):
        adv = responder().handle(message(MessageType.SOLICIT, ia(), *options), SOURCE, NOW)
        assert adv is not None and addresses(adv)  # the address still
        assert adv.boot_file_url is None and adv.vendor_class is None


def test_ipxe_gets_its_script_url_and_the_same_address_as_its_firmware() -> None:
    r = responder()
    firmware = message(MessageType.SOLICIT, ia(1), Option(Opt.RAPID_COMMIT, b""), *HTTP_BOOT)
    first = r.handle(firmware, SOURCE, NOW)
    ipxe = message(
        MessageType.SOLICIT, ia(99), Option(Opt.RAPID_COMMIT, b""),
        opt_u16s(Opt.ORO, Opt.BOOTFILE_URL), opt_length_prefixed(Opt.USER_CLASS, [b"iPXE"]),
        duid=bytes.fromhex("0004") + bytes(16),  # iPXE's DUID-UUID: no MAC in it
    )  # fmt: skip
    second = r.handle(ipxe, SOURCE, NOW + 5)
    assert first is not None and second is not None
    assert addresses(first) == addresses(second) == [("fd00:1::100", 600)]
    assert second.boot_file_url == f"{BASE}/boot/ipxe?mac={MAC}"


def test_rfc8415_section_16_violations_get_no_answer() -> None:
    r = responder()
    other = Option(Opt.SERVERID, duid_ll("52:54:00:99:99:99"))
    ours = Option(Opt.SERVERID, SERVER)
    dropped = [
        message(MessageType.SOLICIT, ia(), ours),  # a Solicit names no server
        message(MessageType.REQUEST, ia(1, "fd00:1::100"), other),  # another server's
        message(MessageType.REQUEST, ia(1, "fd00:1::100")),  # no server named
        message(MessageType.RENEW, ia(1, "fd00:1::100"), other),
        message(MessageType.REBIND, ia(1, "fd00:1::100"), ours),
        message(MessageType.INFORMATION_REQUEST, ia()),  # no IA in an Information-request
        Dhcp6Packet(MessageType.SOLICIT, 1, (ia(),)),  # no Client Identifier
        message(MessageType.ADVERTISE, ours),  # a server's message
        message(MessageType.REPLY, ours),
    ]
    for m in dropped:
        assert r.handle(m, SOURCE, NOW) is None, m
    assert r.births.leases() == ()


def test_a_client_without_a_mac_gets_nothing() -> None:
    uuid = bytes.fromhex("0004") + bytes(16)
    private = IP6("fe80::1234:5678:9abc:def0")  # not EUI-64
    assert client_mac(message(MessageType.SOLICIT, duid=uuid), private) is None
    assert responder().handle(message(MessageType.SOLICIT, ia(), duid=uuid), private, NOW) is None
    # the DUID-LL names it when the source is not EUI-64
    assert client_mac(message(MessageType.SOLICIT), private) == MAC
    assert eui64_mac(SOURCE) == MAC and eui64_mac(IP6("fd00::5054:ff:fe12:3456")) is None


def test_renew_extends_and_refuses_what_is_not_the_clients() -> None:
    r = responder()
    r.handle(message(MessageType.SOLICIT, ia(), Option(Opt.RAPID_COMMIT, b"")), SOURCE, NOW)
    ours = Option(Opt.SERVERID, SERVER)
    renew = message(MessageType.RENEW, ours, ia(1, "fd00:1::100", "fd00:2::1"))
    reply = r.handle(renew, SOURCE, NOW + 400)
    assert reply is not None and reply.msg_type == MessageType.REPLY
    assert addresses(reply) == [("fd00:1::100", 600), ("fd00:2::1", 0)]  # off-link: 0
    binding = r.births.binding(MAC, NOW + 900)
    assert binding is not None  # extended from NOW+400
    # another machine renewing that address gets it with lifetime 0
    thief = message(
        MessageType.RENEW, ours, ia(1, "fd00:1::100"), duid=duid_ll("52:54:00:66:66:66")
    )
    stolen = r.handle(thief, IP6("fe80::1"), NOW + 401)
    assert stolen is not None and addresses(stolen) == [("fd00:1::100", 0)]
    empty = r.handle(message(MessageType.RENEW, ours, ia(1)), SOURCE, NOW + 402)
    assert empty is not None and empty.ia_na[0].status is not None
    assert empty.ia_na[0].status[0] == Status.NO_BINDING


def test_rebind_of_nothing_we_know_gets_no_answer() -> None:
    r = responder()
    assert r.handle(message(MessageType.REBIND, ia(1, "fd00:2::1")), SOURCE, NOW) is None
    reply = r.handle(message(MessageType.REBIND, ia(1, "fd00:1::105")), SOURCE, NOW)
    assert reply is not None and addresses(reply) == [("fd00:1::105", 600)]


def test_release_frees_and_decline_holds_the_address_back() -> None:
    r = responder()
    ours = Option(Opt.SERVERID, SERVER)
    r.handle(message(MessageType.SOLICIT, ia(), Option(Opt.RAPID_COMMIT, b"")), SOURCE, NOW)
    reply = r.handle(message(MessageType.RELEASE, ours, ia(1, "fd00:1::100")), SOURCE, NOW + 1)
    assert reply is not None and reply.status == (Status.SUCCESS, "")
    assert r.births.binding(MAC, NOW + 1) is None
    r.handle(message(MessageType.SOLICIT, ia(), Option(Opt.RAPID_COMMIT, b"")), SOURCE, NOW + 2)
    declined = r.handle(message(MessageType.DECLINE, ours, ia(1, "fd00:1::100")), SOURCE, NOW + 3)
    assert declined is not None and declined.status == (Status.SUCCESS, "")
    again = r.handle(message(MessageType.SOLICIT, ia()), SOURCE, NOW + 4)
    assert again is not None and addresses(again) == [("fd00:1::101", 600)]


def test_confirm_says_whether_the_addresses_are_on_this_link() -> None:
    r = responder()
    on = r.handle(message(MessageType.CONFIRM, ia(1, "fd00:1::abc")), SOURCE, NOW)
    off = r.handle(message(MessageType.CONFIRM, ia(1, "fd00:1::abc", "2001:db8::1")), SOURCE, NOW)
    assert on is not None and on.status is not None and on.status[0] == Status.SUCCESS
    assert off is not None and off.status is not None and off.status[0] == Status.NOT_ON_LINK
    assert r.handle(message(MessageType.CONFIRM, ia(1)), SOURCE, NOW) is None


def test_information_request_gets_configuration_but_no_address() -> None:
    request = message(MessageType.INFORMATION_REQUEST, opt_u16s(Opt.ORO, Opt.DNS_SERVERS))
    reply = responder().handle(request, SOURCE, NOW)
    assert reply is not None and reply.msg_type == MessageType.REPLY
    assert reply.dns_servers == (IP6("fd00:1::53"),) and not reply.ia_na


def test_only_the_first_ia_gets_an_address_and_a_full_range_says_so() -> None:
    r = responder(size=1)
    two = r.handle(message(MessageType.SOLICIT, ia(1), ia(2)), SOURCE, NOW)
    assert two is not None and addresses(two) == [("fd00:1::100", 600)]
    second = two.ia_na[1].status
    assert second is not None and second[0] == Status.NO_ADDRS_AVAIL
    other = r.handle(message(MessageType.SOLICIT, ia(), duid=duid_ll("52:54:00:00:00:99")),
                     IP6("fe80::5054:ff:fe00:99"), NOW)  # fmt: skip
    assert other is not None and not addresses(other)
    assert other.status is not None and other.status[0] == Status.NO_ADDRS_AVAIL


def test_committed_leases_are_persisted_and_read_back(tmp_path: Path) -> None:
    r = responder(tmp_path)
    r.handle(message(MessageType.SOLICIT, ia(), Option(Opt.RAPID_COMMIT, b"")), SOURCE, NOW)
    assert r.births.unsaved
    r.births.save()
    again = BirthLeases6(IP6("fd00:1::100"), IP6("fd00:1::10f"), tmp_path / "leases.json")
    binding = again.binding(MAC, NOW)
    assert binding is not None and binding.ip == IP6("fd00:1::100")


@pytest.mark.parametrize("kind", [MessageType.RELEASE, MessageType.DECLINE])
def test_release_and_decline_of_anothers_address_change_nothing(kind: MessageType) -> None:
    r = responder()
    r.handle(message(MessageType.SOLICIT, ia(), Option(Opt.RAPID_COMMIT, b"")), SOURCE, NOW)
    forged = message(kind, Option(Opt.SERVERID, SERVER), ia(1, "fd00:1::100"),
                     duid=duid_ll("52:54:00:66:66:66"))  # fmt: skip
    r.handle(forged, IP6("fe80::1"), NOW + 1)
    assert r.births.binding(MAC, NOW + 1) is not None


GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", ["ovmf-solicit", "ovmf-request", "ipxe-solicit",
                                  "dhclient-solicit", "dhcpcd-solicit"])  # fmt: skip
def test_our_answers_to_real_clients_match_their_checked_in_text(name: str) -> None:
    """What OVMF, iPXE, dhclient and dhcpcd get from us, in the codec's text form (the
    Request is answered after its Solicit; the server DUID is the one they named)."""
    request = Dhcp6Packet.decode(bytes.fromhex((GOLDEN / f"{name}.hex").read_text().strip()))
    server = request.server_id or SERVER
    births = BirthLeases6(IP6("fd42:6b1:0:1::100"), IP6("fd42:6b1:0:1::1ff"))
    config = Dhcp6Config(server, ipaddress.IPv6Network("fd42:6b1:0:1::/64"), 3600, (),
                         Boot6Config("http://[fd42:6b1:0:1::1]:8080"))  # fmt: skip
    source = IP6(
        "fe80::5054:ff:fe5e:601"
    )  # the QEMU guest's (dhclient's and dhcpcd's DUID name them)
    if name.startswith(("dhclient", "dhcpcd")):
        source = IP6("fe80::1234:5678:9abc:def0")  # not EUI-64: the MAC comes from the DUID
    reply = Responder6(config, births).handle(request, source, NOW)
    assert reply is not None
    text = describe(reply) + "\n"
    expected = GOLDEN / "answers" / f"{name}.txt"
    assert text == expected.read_text(), f"{name}: our answer changed:\n{text}"
