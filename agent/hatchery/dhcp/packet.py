"""The DHCP wire format: a pure codec, no sockets (RFC 2131 section 2, RFC 2132).

``DhcpPacket.decode`` turns untrusted bytes into a frozen packet or raises ``DecodeError``
with a reason; a decoded packet's options are already validated, so the typed accessors
(``message_type``, ``requested_ip``, ``client_arch`` ...) cannot fail on one. ``encode``
writes the BOOTP header, the magic cookie and the options, splitting long ones (RFC 3396)
and padding to the 300-byte BOOTP minimum (RFC 1542 section 2.1).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

from hatchery.errors import HatcheryError

MAGIC_COOKIE = b"\x63\x82\x53\x63"  # RFC 2131 section 3, RFC 2132 section 2
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # RFC 2131 section 2, figure 1
HEADER_SIZE = HEADER.size  # 236
MIN_SIZE = HEADER_SIZE + len(MAGIC_COOKIE)
BOOTP_MIN_SIZE = 300  # RFC 1542 section 2.1: relays may drop shorter BOOTP messages
BROADCAST_FLAG = 0x8000  # RFC 2131 section 2, figure 2
ZERO_IP = ipaddress.IPv4Address(0)


class DecodeError(HatcheryError):
    """The bytes are not a well-formed DHCP message; the message says what is wrong."""


class Op(IntEnum):
    BOOTREQUEST = 1
    BOOTREPLY = 2


class MessageType(IntEnum):  # RFC 2132 section 9.6
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Opt(IntEnum):
    PAD = 0  # RFC 2132 3.1
    SUBNET_MASK = 1  # 3.3
    ROUTER = 3  # 3.5
    DNS = 6  # 3.8
    HOSTNAME = 12  # 3.14
    DOMAIN_NAME = 15  # 3.17
    BROADCAST_ADDRESS = 28  # 5.3
    VENDOR_SPECIFIC = 43  # 8.4 (PXE: its vendor options, PXE 2.1 table 2-1)
    REQUESTED_IP = 50  # 9.1
    LEASE_TIME = 51  # 9.2
    OVERLOAD = 52  # 9.3
    MESSAGE_TYPE = 53  # 9.6
    SERVER_ID = 54  # 9.7
    PARAMETER_REQUEST = 55  # 9.8
    MESSAGE = 56  # 9.9
    MAX_MESSAGE_SIZE = 57  # 9.10
    RENEWAL_TIME = 58  # 9.11
    REBINDING_TIME = 59  # 9.12
    VENDOR_CLASS = 60  # 9.13
    CLIENT_ID = 61  # 9.14
    TFTP_SERVER = 66  # 9.4
    BOOTFILE = 67  # 9.5
    USER_CLASS = 77  # RFC 3004
    CLIENT_ARCH = 93  # RFC 4578 2.1
    CLIENT_NDI = 94  # RFC 4578 2.2
    CLIENT_UUID = 97  # RFC 4578 2.3
    IPXE = 175  # iPXE's encapsulated options (site-specific range, RFC 3942)
    END = 255  # RFC 2132 3.2


class IpxeOpt(IntEnum):
    """Sub-options inside option 175 (iPXE's ``dhcp_settings`` encapsulation)."""

    PRIORITY = 1
    NO_PXEDHCP = 176  # "skip the ProxyDHCP wait"
    BUS_ID = 177
    BIOS_DRIVE = 189
    USERNAME = 190
    PASSWORD = 191


class ClientArch(IntEnum):  # RFC 4578 2.1 and the IANA processor-architecture registry
    BIOS = 0
    EFI_IA32 = 6
    EFI_X64 = 7
    EFI_BC = 9  # EFI byte code; in practice what some x86-64 firmware sends
    EFI_ARM64 = 11
    HTTP_IA32 = 15
    HTTP_X64 = 16
    HTTP_ARM64 = 19


@dataclass(frozen=True, slots=True)
class Option:
    code: int
    data: bytes


def _ip_list(data: bytes) -> tuple[ipaddress.IPv4Address, ...]:
    return tuple(ipaddress.IPv4Address(data[i : i + 4]) for i in range(0, len(data), 4))


def _check_len(
    code: int, data: bytes, *, exact: int = 0, minimum: int = 1, multiple: int = 1
) -> None:
    n = len(data)
    if exact and n != exact:
        raise DecodeError(f"option {code}: length {n}, must be {exact}")
    if n < minimum:
        raise DecodeError(f"option {code}: length {n}, must be at least {minimum}")
    if n % multiple:
        raise DecodeError(f"option {code}: length {n}, must be a multiple of {multiple}")


def parse_suboptions(code: int, data: bytes) -> tuple[Option, ...]:
    """TLV sub-options of an encapsulating option (RFC 2132 8.4 style, as option 175 uses)."""
    subs: list[Option] = []
    i = 0
    while i < len(data):
        sub = data[i]
        if sub == Opt.PAD:
            i += 1
            continue
        if sub == Opt.END:
            break
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            raise DecodeError(f"option {code}: sub-option {sub} runs past the end of the option")
        length = data[i + 1]
        subs.append(Option(sub, data[i + 2 : i + 2 + length]))
        i += 2 + length
    return tuple(subs)


def _validate(code: int, data: bytes) -> None:
    """Per-option format rules (RFC 2132 / 4578 sections named in ``Opt``)."""
    if code in (Opt.SUBNET_MASK, Opt.BROADCAST_ADDRESS, Opt.REQUESTED_IP, Opt.SERVER_ID):
        _check_len(code, data, exact=4)
    elif code in (Opt.ROUTER, Opt.DNS):
        _check_len(code, data, minimum=4, multiple=4)
    elif code in (Opt.LEASE_TIME, Opt.RENEWAL_TIME, Opt.REBINDING_TIME):
        _check_len(code, data, exact=4)
    elif code == Opt.MESSAGE_TYPE:
        _check_len(code, data, exact=1)
        if data[0] not in MessageType._value2member_map_:
            raise DecodeError(f"option 53: unknown message type {data[0]}")
    elif code == Opt.OVERLOAD:
        _check_len(code, data, exact=1)
        if data[0] not in (1, 2, 3):
            raise DecodeError(f"option 52: overload value {data[0]} is not 1, 2 or 3")
    elif code == Opt.MAX_MESSAGE_SIZE:
        _check_len(code, data, exact=2)
        if int.from_bytes(data, "big") < 576:
            raise DecodeError("option 57: maximum message size below 576")
    elif code == Opt.CLIENT_ID:
        _check_len(code, data, minimum=2)
    elif code == Opt.CLIENT_ARCH:
        _check_len(code, data, minimum=2, multiple=2)
    elif code == Opt.CLIENT_NDI:
        _check_len(code, data, exact=3)
    elif code == Opt.CLIENT_UUID:
        if len(data) not in (0, 17):  # some PXE ROMs send it empty; RFC 4578 2.3 says 17
            raise DecodeError(f"option 97: length {len(data)}, must be 17")
        if data and data[0] != 0:
            raise DecodeError(f"option 97: UUID type {data[0]}, must be 0")
    elif code == Opt.IPXE:
        parse_suboptions(code, data)
    elif code in (
        Opt.HOSTNAME,
        Opt.DOMAIN_NAME,
        Opt.PARAMETER_REQUEST,
        Opt.VENDOR_CLASS,
        Opt.TFTP_SERVER,
        Opt.BOOTFILE,
        Opt.USER_CLASS,
    ):
        _check_len(code, data, minimum=1)


def _parse_options(buf: bytes, where: str, out: dict[int, bytearray], order: list[int]) -> None:
    """Walk one options area; repeated codes are concatenated (RFC 3396 section 7)."""
    i = 0
    while i < len(buf):
        code = buf[i]
        if code == Opt.PAD:
            i += 1
            continue
        if code == Opt.END:
            return
        if i + 1 >= len(buf):
            raise DecodeError(f"{where}: option {code} has no length byte")
        length = buf[i + 1]
        if i + 2 + length > len(buf):
            raise DecodeError(f"{where}: option {code} (length {length}) runs past the end")
        if code not in out:
            out[code] = bytearray()
            order.append(code)
        out[code] += buf[i + 2 : i + 2 + length]
        i += 2 + length
    # No END: tolerated when the area ends exactly at an option boundary (seen in the wild).


def _cstring(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


@dataclass(frozen=True, slots=True)
class DhcpPacket:
    """One DHCP message: the fixed BOOTP header (RFC 2131 section 2) and its options."""

    op: Op
    xid: int
    chaddr: bytes  # the client hardware address, ``hlen`` bytes (6 for Ethernet)
    htype: int = 1
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: ipaddress.IPv4Address = ZERO_IP
    yiaddr: ipaddress.IPv4Address = ZERO_IP
    siaddr: ipaddress.IPv4Address = ZERO_IP
    giaddr: ipaddress.IPv4Address = ZERO_IP
    sname: bytes = b""
    file: bytes = b""
    options: tuple[Option, ...] = field(default=())

    # --- decode / encode ------------------------------------------------------------------

    @classmethod
    def decode(cls, data: bytes) -> DhcpPacket:
        if len(data) < MIN_SIZE:
            raise DecodeError(f"{len(data)} bytes: shorter than a DHCP message ({MIN_SIZE})")
        (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file) = (
            HEADER.unpack_from(data)
        )
        if op not in (Op.BOOTREQUEST, Op.BOOTREPLY):
            raise DecodeError(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
        if not 1 <= hlen <= 16:
            raise DecodeError(f"hardware address length {hlen} is not 1-16")
        if data[HEADER_SIZE:MIN_SIZE] != MAGIC_COOKIE:
            raise DecodeError("no DHCP magic cookie (a plain BOOTP message, or not BOOTP)")
        found: dict[int, bytearray] = {}
        order: list[int] = []
        _parse_options(data[MIN_SIZE:], "options", found, order)
        overload = found.get(Opt.OVERLOAD)
        if overload is not None:
            if len(overload) != 1 or overload[0] not in (1, 2, 3):
                raise DecodeError("option 52: overload value must be one byte of 1, 2 or 3")
            # RFC 2132 9.3: 'file' then 'sname' hold further options
            if overload[0] & 1:
                _parse_options(file, "file field", found, order)
            if overload[0] & 2:
                _parse_options(sname, "sname field", found, order)
        if Opt.MESSAGE_TYPE not in found:
            raise DecodeError("no option 53 (DHCP message type)")
        options = []
        for code in order:
            value = bytes(found[code])
            _validate(code, value)
            options.append(Option(code, value))
        over = overload[0] if overload is not None else 0
        return cls(
            op=Op(op),
            xid=xid,
            chaddr=chaddr[:hlen],
            htype=htype,
            hops=hops,
            secs=secs,
            flags=flags,
            ciaddr=ipaddress.IPv4Address(ci),
            yiaddr=ipaddress.IPv4Address(yi),
            siaddr=ipaddress.IPv4Address(si),
            giaddr=ipaddress.IPv4Address(gi),
            sname=b"" if over & 2 else _cstring(sname),
            file=b"" if over & 1 else _cstring(file),
            options=tuple(options),
        )

    def encode(self) -> bytes:
        if len(self.sname) > 63 or len(self.file) > 127:
            raise ValueError("sname/file too long for the BOOTP header (63/127 bytes)")
        header = HEADER.pack(
            self.op,
            self.htype,
            len(self.chaddr),
            self.hops,
            self.xid,
            self.secs,
            self.flags,
            self.ciaddr.packed,
            self.yiaddr.packed,
            self.siaddr.packed,
            self.giaddr.packed,
            self.chaddr,
            self.sname,
            self.file,
        )
        parts = [header, MAGIC_COOKIE]
        for opt in self.options:
            code, data = opt.code, opt.data
            if code == Opt.PAD or code == Opt.END:
                continue
            if len(data) <= 255:
                parts += (bytes((code, len(data))), data)
                continue
            # RFC 3396: a value over 255 bytes goes out as consecutive instances of the code
            for start in range(0, len(data), 255):
                chunk = data[start : start + 255]
                parts += (bytes((code, len(chunk))), chunk)
        parts.append(b"\xff")
        out = b"".join(parts)
        if len(out) < BOOTP_MIN_SIZE:
            out += bytes(BOOTP_MIN_SIZE - len(out))
        return out

    # --- typed accessors (valid on decoded packets: decode checked the formats) -----------

    def get(self, code: int) -> bytes | None:
        for opt in self.options:
            if opt.code == code:
                return opt.data
        return None

    @property
    def mac(self) -> str:
        """The client hardware address as lower-case ``aa:bb:cc:dd:ee:ff``."""
        return ":".join(f"{b:02x}" for b in self.chaddr)

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    @property
    def message_type(self) -> MessageType:
        raw = self.get(Opt.MESSAGE_TYPE)
        if raw is None or len(raw) != 1:
            raise DecodeError("no valid option 53 (DHCP message type)")
        return MessageType(raw[0])

    def _ip(self, code: int) -> ipaddress.IPv4Address | None:
        raw = self.get(code)
        return ipaddress.IPv4Address(raw) if raw is not None and len(raw) == 4 else None

    @property
    def requested_ip(self) -> ipaddress.IPv4Address | None:
        return self._ip(Opt.REQUESTED_IP)

    @property
    def server_id(self) -> ipaddress.IPv4Address | None:
        return self._ip(Opt.SERVER_ID)

    @property
    def subnet_mask(self) -> ipaddress.IPv4Address | None:
        return self._ip(Opt.SUBNET_MASK)

    @property
    def routers(self) -> tuple[ipaddress.IPv4Address, ...]:
        return _ip_list(self.get(Opt.ROUTER) or b"")

    @property
    def dns_servers(self) -> tuple[ipaddress.IPv4Address, ...]:
        return _ip_list(self.get(Opt.DNS) or b"")

    @property
    def lease_time(self) -> int | None:
        raw = self.get(Opt.LEASE_TIME)
        return int.from_bytes(raw, "big") if raw is not None else None

    @property
    def vendor_class(self) -> bytes | None:
        return self.get(Opt.VENDOR_CLASS)

    @property
    def user_class(self) -> bytes | None:
        return self.get(Opt.USER_CLASS)

    @property
    def client_arch(self) -> tuple[int, ...]:
        raw = self.get(Opt.CLIENT_ARCH) or b""
        return tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw) - 1, 2))

    @property
    def ipxe_options(self) -> tuple[Option, ...]:
        raw = self.get(Opt.IPXE)
        return parse_suboptions(Opt.IPXE, raw) if raw is not None else ()

    @property
    def hostname(self) -> str | None:
        raw = self.get(Opt.HOSTNAME)
        return raw.decode("ascii", "replace") if raw is not None else None

    @property
    def bootfile(self) -> bytes:
        """Option 67 if present, else the header's ``file`` field."""
        return self.get(Opt.BOOTFILE) or self.file

    def user_classes(self) -> tuple[bytes, ...]:
        """Option 77 as a list of classes: RFC 3004's length-prefixed form, or, when the
        bytes do not parse that way (iPXE sends the raw string ``iPXE``), one raw class."""
        raw = self.user_class
        if raw is None:
            return ()
        classes: list[bytes] = []
        i = 0
        while i < len(raw):
            n = raw[i]
            if n == 0 or i + 1 + n > len(raw):
                return (raw,)
            classes.append(raw[i + 1 : i + 1 + n])
            i += 1 + n
        return tuple(classes)


# --- builders for option values -------------------------------------------------------------


def opt_ip(code: int, *addrs: ipaddress.IPv4Address) -> Option:
    return Option(code, b"".join(a.packed for a in addrs))


def opt_u32(code: int, value: int) -> Option:
    return Option(code, value.to_bytes(4, "big"))


def opt_u8(code: int, value: int) -> Option:
    return Option(code, bytes((value,)))


def opt_str(code: int, value: str | bytes) -> Option:
    return Option(code, value.encode() if isinstance(value, str) else value)


def encapsulate(code: int, subs: Iterable[Option]) -> Option:
    """An encapsulating option (such as 175) from its sub-options."""
    return Option(code, b"".join(bytes((s.code, len(s.data))) + s.data for s in subs))


def describe(packet: DhcpPacket) -> str:
    """A stable, readable text form (used by the golden tests and in debug logs)."""
    names: Mapping[int, str] = {o.value: o.name.lower() for o in Opt}
    lines = [
        f"op={packet.op.name} htype={packet.htype} hops={packet.hops} xid=0x{packet.xid:08x}"
        f" secs={packet.secs} flags=0x{packet.flags:04x}",
        f"ciaddr={packet.ciaddr} yiaddr={packet.yiaddr} siaddr={packet.siaddr}"
        f" giaddr={packet.giaddr} chaddr={packet.mac}",
        f"sname={packet.sname!r} file={packet.file!r}",
    ]
    for opt in packet.options:
        name = names.get(opt.code, f"option-{opt.code}")
        if opt.code == Opt.MESSAGE_TYPE:
            value = MessageType(opt.data[0]).name
        elif opt.code in (Opt.SUBNET_MASK, Opt.ROUTER, Opt.DNS, Opt.REQUESTED_IP, Opt.SERVER_ID,
                          Opt.BROADCAST_ADDRESS):  # fmt: skip
            value = ",".join(str(a) for a in _ip_list(opt.data))
        elif opt.code in (Opt.LEASE_TIME, Opt.RENEWAL_TIME, Opt.REBINDING_TIME,
                          Opt.MAX_MESSAGE_SIZE):  # fmt: skip
            value = str(int.from_bytes(opt.data, "big"))
        elif opt.code == Opt.PARAMETER_REQUEST:
            value = ",".join(str(b) for b in opt.data)
        elif opt.code == Opt.CLIENT_ARCH:
            value = ",".join(str(a) for a in packet.client_arch)
        elif opt.code == Opt.IPXE:
            value = " ".join(f"{s.code}={s.data.hex()}" for s in parse_suboptions(175, opt.data))
        else:
            value = repr(opt.data)
        lines.append(f"  {opt.code:3d} {name}: {value}")
    return "\n".join(lines)
