"""The DHCPv6 wire format: a pure codec, no sockets (RFC 8415 sections 8 and 21, RFC 5970).

``Dhcp6Packet.decode`` turns untrusted bytes into a frozen packet or raises ``DecodeError``
with a reason. Every option this server reads is validated at decode time (lengths, nesting,
counts), so the typed accessors (``client_id``, ``ia_na``, ``client_arch`` ...) cannot fail
on a decoded packet. Only the client/server message format (RFC 8415 section 8) is decoded:
relay messages (section 9) are refused, as this server serves its own link only.
``encode`` writes the same format; the helpers below build the options the server sends.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from hatchery.errors import HatcheryError

CLIENT_PORT = 546  # RFC 8415 section 7.2
SERVER_PORT = 547
ALL_SERVERS = "ff02::1:2"  # All_DHCP_Relay_Agents_and_Servers, section 7.1
MAX_SIZE = 1500  # one Ethernet frame: a client message never needs more here
MAX_OPTIONS = 64  # per level: a real client sends about a dozen
MAX_DUID = 130  # section 11.1: a DUID is at most 128 octets plus its 2-octet type
INFINITY = 0xFFFFFFFF  # section 7.7


class DecodeError(HatcheryError):
    """The bytes are not a well-formed DHCPv6 message; the message says what is wrong."""


class MessageType(IntEnum):  # RFC 8415 section 7.3
    SOLICIT = 1
    ADVERTISE = 2
    REQUEST = 3
    CONFIRM = 4
    RENEW = 5
    REBIND = 6
    REPLY = 7
    RELEASE = 8
    DECLINE = 9
    RECONFIGURE = 10
    INFORMATION_REQUEST = 11


class Opt(IntEnum):
    CLIENTID = 1  # RFC 8415 21.2
    SERVERID = 2  # 21.3
    IA_NA = 3  # 21.4
    IA_TA = 4  # 21.5
    IAADDR = 5  # 21.6
    ORO = 6  # 21.7
    PREFERENCE = 7  # 21.8
    ELAPSED_TIME = 8  # 21.9
    UNICAST = 12  # 21.12
    STATUS_CODE = 13  # 21.13
    RAPID_COMMIT = 14  # 21.14
    USER_CLASS = 15  # 21.15
    VENDOR_CLASS = 16  # 21.16
    VENDOR_OPTS = 17  # 21.17
    RECONF_ACCEPT = 20  # 21.20
    DNS_SERVERS = 23  # RFC 3646 3
    IA_PD = 25  # 21.21
    BOOTFILE_URL = 59  # RFC 5970 3.1
    BOOTFILE_PARAM = 60  # RFC 5970 3.2
    CLIENT_ARCH = 61  # RFC 5970 3.3
    NII = 62  # RFC 5970 3.4


class Status(IntEnum):  # RFC 8415 section 21.13
    SUCCESS = 0
    UNSPEC_FAIL = 1
    NO_ADDRS_AVAIL = 2
    NO_BINDING = 3
    NOT_ON_LINK = 4
    USE_MULTICAST = 5


class DuidType(IntEnum):  # RFC 8415 section 11.1
    LLT = 1
    EN = 2
    LL = 3
    UUID = 4  # RFC 6355


@dataclass(frozen=True, slots=True)
class Option:
    code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IaAddress:
    """An IA Address option (RFC 8415 21.6): an address and its lifetimes in seconds."""

    address: ipaddress.IPv6Address
    preferred: int
    valid: int
    options: tuple[Option, ...] = ()

    def encode(self) -> Option:
        head = self.address.packed + struct.pack("!II", self.preferred, self.valid)
        return Option(Opt.IAADDR, head + encode_options(self.options))


@dataclass(frozen=True, slots=True)
class IaNa:
    """An Identity Association for Non-temporary Addresses (RFC 8415 21.4)."""

    iaid: int
    t1: int = 0
    t2: int = 0
    options: tuple[Option, ...] = ()

    @property
    def addresses(self) -> tuple[IaAddress, ...]:
        return tuple(_ia_address(o.data) for o in self.options if o.code == Opt.IAADDR)

    @property
    def status(self) -> tuple[Status | int, str] | None:
        return _status(self.options)

    def encode(self) -> Option:
        head = struct.pack("!III", self.iaid, self.t1, self.t2)
        return Option(Opt.IA_NA, head + encode_options(self.options))


def _ia_address(data: bytes) -> IaAddress:
    preferred, valid = struct.unpack_from("!II", data, 16)
    options = decode_options(data[24:], "IAADDR", nested=True)
    return IaAddress(ipaddress.IPv6Address(data[:16]), preferred, valid, options)


def _status(options: Iterable[Option]) -> tuple[Status | int, str] | None:
    for o in options:
        if o.code == Opt.STATUS_CODE:
            (code,) = struct.unpack_from("!H", o.data)
            known = code in Status._value2member_map_
            return (Status(code) if known else code), o.data[2:].decode("utf-8", "replace")
    return None


def _length_prefixed(code: int, data: bytes) -> tuple[bytes, ...]:
    """The ``opaque-data`` list of RFC 8415 21.15/21.16 (2-octet length, then data)."""
    items, i = [], 0
    while i < len(data):
        if i + 2 > len(data):
            raise DecodeError(f"option {code}: truncated item length at {i}")
        (n,) = struct.unpack_from("!H", data, i)
        if i + 2 + n > len(data):
            raise DecodeError(f"option {code}: item of {n} bytes overruns the option")
        items.append(data[i + 2 : i + 2 + n])
        i += 2 + n
    return tuple(items)


def _check(code: int, data: bytes, *, exact: int = -1, minimum: int = 0, maximum: int = 65535,
           multiple: int = 1) -> None:  # fmt: skip
    n = len(data)
    if exact >= 0 and n != exact:
        raise DecodeError(f"option {code}: length {n}, must be {exact}")
    if not minimum <= n <= maximum:
        raise DecodeError(f"option {code}: length {n}, must be {minimum}..{maximum}")
    if n % multiple:
        raise DecodeError(f"option {code}: length {n} is not a multiple of {multiple}")


def _validate(code: int, data: bytes, nested: bool) -> None:
    """Check the options this server reads, so their accessors cannot fail later."""
    if code in (Opt.CLIENTID, Opt.SERVERID):
        _check(code, data, minimum=3, maximum=MAX_DUID)  # 11.1: type + at least one octet
    elif code == Opt.IA_NA:
        if nested:
            raise DecodeError("option 3: IA_NA inside another option")
        _check(code, data, minimum=12)
        decode_options(data[12:], "IA_NA", nested=True)
    elif code == Opt.IAADDR:
        if not nested:
            raise DecodeError("option 5: IAADDR outside an IA")
        _check(code, data, minimum=24)
        decode_options(data[24:], "IAADDR", nested=True)
    elif code == Opt.ORO:
        _check(code, data, multiple=2)
    elif code == Opt.ELAPSED_TIME:
        _check(code, data, exact=2)
    elif code == Opt.STATUS_CODE:
        _check(code, data, minimum=2)
    elif code == Opt.RAPID_COMMIT:
        _check(code, data, exact=0)
    elif code == Opt.USER_CLASS:
        _length_prefixed(code, data)
    elif code == Opt.VENDOR_CLASS:
        _check(code, data, minimum=4)
        _length_prefixed(code, data[4:])
    elif code == Opt.DNS_SERVERS:
        _check(code, data, multiple=16)
    elif code == Opt.CLIENT_ARCH:
        _check(code, data, minimum=2, multiple=2)
    elif code == Opt.NII:
        _check(code, data, exact=3)
    elif code == Opt.BOOTFILE_PARAM:
        _length_prefixed(code, data)


def decode_options(buf: bytes, where: str, nested: bool = False) -> tuple[Option, ...]:
    """Options in order (RFC 8415 21.1: 2-octet code, 2-octet length, data); repeats kept."""
    options: list[Option] = []
    i = 0
    while i < len(buf):
        if i + 4 > len(buf):
            raise DecodeError(f"{where}: truncated option header at offset {i}")
        code, n = struct.unpack_from("!HH", buf, i)
        if i + 4 + n > len(buf):
            raise DecodeError(f"{where}: option {code} of {n} bytes overruns the message")
        if len(options) >= MAX_OPTIONS:
            raise DecodeError(f"{where}: more than {MAX_OPTIONS} options")
        data = bytes(buf[i + 4 : i + 4 + n])
        _validate(code, data, nested)
        options.append(Option(code, data))
        i += 4 + n
    return tuple(options)


def encode_options(options: Iterable[Option]) -> bytes:
    out = bytearray()
    for o in options:
        if len(o.data) > 0xFFFF:
            raise ValueError(f"option {o.code}: {len(o.data)} bytes do not fit")
        out += struct.pack("!HH", o.code, len(o.data)) + o.data
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Dhcp6Packet:
    """A client/server message (RFC 8415 section 8): type, 24-bit transaction id, options."""

    msg_type: MessageType
    transaction_id: int
    options: tuple[Option, ...] = ()

    @classmethod
    def decode(cls, data: bytes) -> Dhcp6Packet:
        if len(data) < 4:
            raise DecodeError(f"{len(data)} bytes: shorter than the 4-byte header")
        if len(data) > MAX_SIZE:
            raise DecodeError(f"{len(data)} bytes: longer than {MAX_SIZE}")
        try:
            kind = MessageType(data[0])
        except ValueError:
            raise DecodeError(f"message type {data[0]}: not a client/server message") from None
        xid = int.from_bytes(data[1:4], "big")
        return cls(kind, xid, decode_options(data[4:], kind.name))

    def encode(self) -> bytes:
        return (
            bytes((self.msg_type,)) + self.transaction_id.to_bytes(3, "big")
            + encode_options(self.options)
        )  # fmt: skip

    # --- typed accessors (valid by construction after decode) -------------------------------
    def get(self, code: int) -> bytes | None:
        """The first option ``code``'s data, or None."""
        return next((o.data for o in self.options if o.code == code), None)

    def count(self, code: int) -> int:
        return sum(1 for o in self.options if o.code == code)

    @property
    def client_id(self) -> bytes | None:
        return self.get(Opt.CLIENTID)

    @property
    def server_id(self) -> bytes | None:
        return self.get(Opt.SERVERID)

    @property
    def ia_na(self) -> tuple[IaNa, ...]:
        out = []
        for o in self.options:
            if o.code == Opt.IA_NA:
                iaid, t1, t2 = struct.unpack_from("!III", o.data)
                out.append(IaNa(iaid, t1, t2, decode_options(o.data[12:], "IA_NA", True)))
        return tuple(out)

    @property
    def requested_options(self) -> tuple[int, ...]:
        data = self.get(Opt.ORO) or b""
        return struct.unpack(f"!{len(data) // 2}H", data)

    @property
    def rapid_commit(self) -> bool:
        return self.get(Opt.RAPID_COMMIT) is not None

    @property
    def elapsed(self) -> int | None:
        data = self.get(Opt.ELAPSED_TIME)
        return struct.unpack("!H", data)[0] if data is not None else None

    @property
    def user_classes(self) -> tuple[bytes, ...]:
        return tuple(
            item
            for o in self.options if o.code == Opt.USER_CLASS
            for item in _length_prefixed(o.code, o.data)
        )  # fmt: skip

    @property
    def vendor_class(self) -> tuple[int, tuple[bytes, ...]] | None:
        """The first Vendor Class option: enterprise number and its class data items."""
        data = self.get(Opt.VENDOR_CLASS)
        if data is None:
            return None
        return struct.unpack_from("!I", data)[0], _length_prefixed(Opt.VENDOR_CLASS, data[4:])

    @property
    def client_arch(self) -> tuple[int, ...]:
        data = self.get(Opt.CLIENT_ARCH) or b""
        return struct.unpack(f"!{len(data) // 2}H", data)

    @property
    def boot_file_url(self) -> str | None:
        data = self.get(Opt.BOOTFILE_URL)
        return data.decode("utf-8", "replace") if data is not None else None

    @property
    def status(self) -> tuple[Status | int, str] | None:
        return _status(self.options)

    @property
    def dns_servers(self) -> tuple[ipaddress.IPv6Address, ...]:
        data = self.get(Opt.DNS_SERVERS) or b""
        return tuple(ipaddress.IPv6Address(data[i : i + 16]) for i in range(0, len(data), 16))


def duid_mac(duid: bytes) -> str | None:
    """The Ethernet address inside a DUID-LLT or DUID-LL (RFC 8415 11.2, 11.4), if any."""
    if len(duid) < 4:
        return None
    kind, hwtype = struct.unpack_from("!HH", duid)
    body = duid[8:] if kind == DuidType.LLT else duid[4:] if kind == DuidType.LL else b""
    if hwtype != 1 or len(body) != 6:  # hardware type 1: Ethernet (RFC 826)
        return None
    return ":".join(f"{b:02x}" for b in body)


def duid_ll(mac: str) -> bytes:
    """Our own DUID: DUID-LL of the interface's Ethernet address (RFC 8415 11.4)."""
    return struct.pack("!HH", DuidType.LL, 1) + bytes.fromhex(mac.replace(":", ""))


def opt_status(code: Status, message: str = "") -> Option:
    return Option(Opt.STATUS_CODE, struct.pack("!H", code) + message.encode())


def opt_u16s(code: int, *values: int) -> Option:
    return Option(code, struct.pack(f"!{len(values)}H", *values))


def opt_addresses(code: int, *addrs: ipaddress.IPv6Address) -> Option:
    return Option(code, b"".join(a.packed for a in addrs))


def opt_length_prefixed(code: int, items: Iterable[bytes], prefix: bytes = b"") -> Option:
    """User Class, Vendor Class (``prefix``: its enterprise number) and Boot File Parameters."""
    return Option(code, prefix + b"".join(struct.pack("!H", len(i)) + i for i in items))


def describe(packet: Dhcp6Packet) -> str:
    """A stable text form for golden tests and debugging."""
    lines = [f"{packet.msg_type.name} xid={packet.transaction_id:06x}"]

    def walk(options: tuple[Option, ...], indent: str) -> None:
        for o in options:
            name = Opt(o.code).name if o.code in Opt._value2member_map_ else str(o.code)
            if o.code == Opt.IA_NA:
                iaid, t1, t2 = struct.unpack_from("!III", o.data)
                lines.append(f"{indent}IA_NA iaid={iaid:08x} t1={t1} t2={t2}")
                walk(decode_options(o.data[12:], "IA_NA", True), indent + "  ")
            elif o.code == Opt.IAADDR:
                a = _ia_address(o.data)
                lines.append(f"{indent}IAADDR {a.address} preferred={a.preferred} "
                             f"valid={a.valid}")  # fmt: skip
                walk(a.options, indent + "  ")
            elif o.code == Opt.ORO:
                lines.append(f"{indent}ORO {list(opt_values(o.data))}")
            elif o.code in (Opt.CLIENT_ARCH, Opt.ELAPSED_TIME):
                lines.append(f"{indent}{name} {list(opt_values(o.data))}")
            elif o.code == Opt.VENDOR_CLASS:
                (enterprise,) = struct.unpack_from("!I", o.data)
                items = _length_prefixed(o.code, o.data[4:])
                lines.append(
                    f"{indent}VENDOR_CLASS {enterprise} {[i.decode('latin-1') for i in items]}"
                )
            elif o.code == Opt.USER_CLASS:
                items = _length_prefixed(o.code, o.data)
                lines.append(f"{indent}USER_CLASS {[i.decode('latin-1') for i in items]}")
            elif o.code in (Opt.BOOTFILE_URL,):
                lines.append(f"{indent}{name} {o.data.decode('latin-1')!r}")
            elif o.code == Opt.STATUS_CODE:
                st = _status((o,))
                assert st is not None
                code = st[0].name if isinstance(st[0], Status) else st[0]
                lines.append(f"{indent}STATUS_CODE {code} {st[1]!r}")
            else:
                lines.append(f"{indent}{name} {o.data.hex()}")

    walk(packet.options, "  ")
    return "\n".join(lines)


def opt_values(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"!{len(data) // 2}H", data)
