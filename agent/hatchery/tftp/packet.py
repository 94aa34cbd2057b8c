"""TFTP packet codec: bytes <-> frozen dataclasses, no I/O.

Formats from RFC 1350 section 5 ("TFTP Packets") and RFC 2347 ("Packet Formats": options
appended to requests, the OACK packet). Option *values* are left as strings here; their
meaning (RFC 2348 blksize, RFC 2349 timeout and tsize, RFC 7440 windowsize) is interpreted by
``hatchery.tftp.transfer.negotiate``.

``decode`` raises ``PacketError`` -- and only ``PacketError`` -- for anything that is not a
well-formed packet: garbage from the network must never surface as another exception.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self, TypeVar, Union

# RFC 1350 section 5: the first two bytes of every packet.
OP_RRQ = 1
OP_WRQ = 2
OP_DATA = 3
OP_ACK = 4
OP_ERROR = 5
OP_OACK = 6  # RFC 2347, "Packet Formats"

# RFC 2348, "Blocksize Option Specification": 8..65464 octets; 512 without the option.
MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
DEFAULT_BLKSIZE = 512

_U16 = struct.Struct("!H")
_HEADER = struct.Struct("!HH")  # opcode + block number / error code


class PacketError(ValueError):
    """The bytes are not a well-formed TFTP packet (or a field cannot be encoded)."""


class ErrorCode(enum.IntEnum):
    """RFC 1350 Appendix ("Error Codes"), plus 8 from RFC 2347 ("Negotiation Protocol")."""

    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


Options = tuple[tuple[str, str], ...]


def _cstring(value: str, what: str, codec: str) -> bytes:
    try:
        raw = value.encode(codec)
    except UnicodeEncodeError as exc:
        raise PacketError(f"{what} {value!r} is not {codec}") from exc
    if b"\0" in raw:
        raise PacketError(f"{what} {value!r} contains a NUL byte")
    return raw + b"\0"


def _encode_options(options: Options) -> bytes:
    return b"".join(
        _cstring(name, "option name", "ascii") + _cstring(value, "option value", "ascii")
        for name, value in options
    )


def _decode_options(fields: list[bytes]) -> Options:
    """RFC 2347 "Packet Formats": name/value pairs, names case-insensitive and unique."""
    if len(fields) % 2:
        raise PacketError("option without a value")
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for i in range(0, len(fields), 2):
        name = _ascii(fields[i], "option name").lower()
        value = _ascii(fields[i + 1], "option value")
        if not name:
            raise PacketError("empty option name")
        if name in seen:
            raise PacketError(f"option {name!r} given twice")
        seen.add(name)
        out.append((name, value))
    return tuple(out)


def _ascii(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise PacketError(f"{what} is not ASCII") from None


def _check_u16(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFF:
        raise PacketError(f"{what} {value} does not fit in 16 bits")


@dataclass(frozen=True, slots=True)
class _Request:
    """RRQ/WRQ, RFC 1350 section 5 (figure 5-1) with RFC 2347 options appended."""

    OPCODE: ClassVar[int] = 0
    filename: str
    mode: str
    options: Options = ()

    def encode(self) -> bytes:
        if not self.filename:
            raise PacketError("empty filename")
        if not self.mode:
            raise PacketError("empty mode")
        return (
            _U16.pack(self.OPCODE)
            + _cstring(self.filename, "filename", "utf-8")
            + _cstring(self.mode, "mode", "ascii")
            + _encode_options(self.options)
        )

    @classmethod
    def _from_body(cls, body: bytes) -> Self:
        # Every field is NUL-terminated, so the body ends in NUL and splits cleanly.
        if not body.endswith(b"\0"):
            raise PacketError("request does not end in a NUL byte")
        fields = body[:-1].split(b"\0")
        if len(fields) < 2:
            raise PacketError("request without a mode")
        raw_name, raw_mode, *raw_options = fields
        if not raw_name:
            raise PacketError("empty filename")
        try:
            filename = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise PacketError("filename is not UTF-8") from None
        mode = _ascii(raw_mode, "mode").lower()
        if not mode:
            raise PacketError("empty mode")
        return cls(filename, mode, _decode_options(raw_options))

    def option(self, name: str) -> str | None:
        for key, value in self.options:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class RRQ(_Request):
    OPCODE: ClassVar[int] = OP_RRQ

    @classmethod
    def decode(cls, data: bytes) -> RRQ:
        return _expect(decode(data), cls)


@dataclass(frozen=True, slots=True)
class WRQ(_Request):
    OPCODE: ClassVar[int] = OP_WRQ

    @classmethod
    def decode(cls, data: bytes) -> WRQ:
        return _expect(decode(data), cls)


@dataclass(frozen=True, slots=True)
class DATA:
    """RFC 1350 section 5, figure 5-2: block number and 0..blksize bytes of data."""

    OPCODE: ClassVar[int] = OP_DATA
    block: int
    data: bytes

    def encode(self) -> bytes:
        _check_u16(self.block, "block number")
        if len(self.data) > MAX_BLKSIZE:
            raise PacketError(f"{len(self.data)} bytes of data exceed {MAX_BLKSIZE}")
        return _HEADER.pack(OP_DATA, self.block) + self.data

    @classmethod
    def decode(cls, data: bytes) -> DATA:
        return _expect(decode(data), cls)


@dataclass(frozen=True, slots=True)
class ACK:
    """RFC 1350 section 5, figure 5-3: exactly opcode and block number."""

    OPCODE: ClassVar[int] = OP_ACK
    block: int

    def encode(self) -> bytes:
        _check_u16(self.block, "block number")
        return _HEADER.pack(OP_ACK, self.block)

    @classmethod
    def decode(cls, data: bytes) -> ACK:
        return _expect(decode(data), cls)


@dataclass(frozen=True, slots=True)
class ERROR:
    """RFC 1350 section 5, figure 5-4: error code and a NUL-terminated message."""

    OPCODE: ClassVar[int] = OP_ERROR
    code: int
    message: str = ""

    def encode(self) -> bytes:
        _check_u16(self.code, "error code")
        return _HEADER.pack(OP_ERROR, self.code) + _cstring(self.message, "message", "utf-8")

    @classmethod
    def decode(cls, data: bytes) -> ERROR:
        return _expect(decode(data), cls)


@dataclass(frozen=True, slots=True)
class OACK:
    """RFC 2347 "Packet Formats": the options the server accepted, with their values."""

    OPCODE: ClassVar[int] = OP_OACK
    options: Options

    def encode(self) -> bytes:
        return _U16.pack(OP_OACK) + _encode_options(self.options)

    @classmethod
    def decode(cls, data: bytes) -> OACK:
        return _expect(decode(data), cls)

    def option(self, name: str) -> str | None:
        for key, value in self.options:
            if key == name:
                return value
        return None


Packet = Union[RRQ, WRQ, DATA, ACK, ERROR, OACK]  # noqa: UP007 (a runtime alias)


_P = TypeVar("_P")


def _expect(packet: object, cls: type[_P]) -> _P:
    if not isinstance(packet, cls):
        raise PacketError(f"expected {cls.__name__}, got {type(packet).__name__}")
    return packet


def decode(data: bytes | bytearray | memoryview) -> Packet:
    """Parse one datagram. Raises ``PacketError`` (only) if it is not a TFTP packet."""
    data = bytes(data)
    if len(data) < 2:
        raise PacketError(f"{len(data)}-byte datagram is shorter than an opcode")
    opcode = (data[0] << 8) | data[1]
    if opcode == OP_RRQ:
        return RRQ._from_body(data[2:])
    if opcode == OP_WRQ:
        return WRQ._from_body(data[2:])
    if opcode == OP_DATA:
        if len(data) < 4:
            raise PacketError("DATA without a block number")
        if len(data) > 4 + MAX_BLKSIZE:
            raise PacketError(f"DATA with {len(data) - 4} bytes exceeds {MAX_BLKSIZE}")
        return DATA((data[2] << 8) | data[3], data[4:])
    if opcode == OP_ACK:
        if len(data) != 4:
            raise PacketError(f"ACK is {len(data)} bytes, not 4")
        return ACK((data[2] << 8) | data[3])
    if opcode == OP_ERROR:
        if len(data) < 5 or not data.endswith(b"\0"):
            raise PacketError("ERROR without a NUL-terminated message")
        message = data[4:-1]
        if b"\0" in message:
            raise PacketError("ERROR message contains a NUL byte")
        # The message is for humans (RFC 1350: netascii); never fail on its bytes.
        return ERROR((data[2] << 8) | data[3], message.decode("utf-8", "replace"))
    if opcode == OP_OACK:
        body = data[2:]
        if not body:
            return OACK(())
        if not body.endswith(b"\0"):
            raise PacketError("OACK does not end in a NUL byte")
        return OACK(_decode_options(body[:-1].split(b"\0")))
    raise PacketError(f"unknown opcode {opcode}")
