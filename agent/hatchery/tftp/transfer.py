"""One read transfer: option negotiation, the sending state machine and its data source.

No sockets here: ``ReadTransfer`` is driven by the datagrams and timeouts it is handed and
emits packets through a ``send`` callable, so it is tested without a network. The asyncio
side lives in ``hatchery.tftp.server``.

Block numbers are tracked as absolute integers (block 1 is the first 512/blksize bytes) and
only truncated to 16 bits on the wire; they roll over from 65535 to 0 as curl, atftp,
tftp-hpa, iPXE and U-Boot expect, so files of any size up to the server's limit transfer
(RFC 1350 itself stops at 65535 blocks: 32 MB at 512-byte blocks).
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from hatchery.tftp.packet import (
    DEFAULT_BLKSIZE,
    ERROR,
    MAX_BLKSIZE,
    MIN_BLKSIZE,
    OACK,
    OP_ACK,
    OP_DATA,
    ErrorCode,
    Options,
    PacketError,
    decode,
)

_DATA_HEADER = struct.Struct("!HH")
_CHUNK = 256 * 1024  # bytes read from the file at a time
# One batch (one UDP GSO send): Linux takes at most 64 segments and 64 KiB of IP payload.
_BATCH_SEGMENTS = 64
_BATCH_BYTES = 65000


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What a transfer runs with, and the OACK options to send (empty: no OACK)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = 1.0
    oack: Options = ()


def _number(value: str, low: int, high: int) -> int | None:
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        return None
    number = int(value)
    return number if low <= number <= high else None


def negotiate(
    requested: Options,
    *,
    size: int,
    max_blksize: int,
    max_windowsize: int,
    default_timeout: float,
    max_timeout: int = 255,
) -> Negotiated:
    """RFC 2347 "Negotiation Protocol": acknowledge only recognised options with valid values.

    Unknown options and out-of-range values are left out of the OACK (never an error), and
    an acknowledged value is never larger than the one requested.

    ``timeout`` above ``max_timeout`` is not acknowledged (the transfer keeps the server's
    own timeout): RFC 2349 lets a client ask for up to 255 s, and forged requests asking for
    that held every transfer slot for minutes (issue 14). RFC 2349 requires an acknowledged
    timeout to equal the requested one, so declining the option is the only way to cap it.
    """
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, default_timeout
    acked: list[tuple[str, str]] = []
    for name, value in requested:
        if name == "blksize":  # RFC 2348: 8..65464; the server may answer a smaller value
            number = _number(value, MIN_BLKSIZE, MAX_BLKSIZE)
            if number is not None:
                blksize = min(number, max_blksize)
                acked.append((name, str(blksize)))
        elif name == "tsize":  # RFC 2349 "Transfer Size Option": a RRQ carries 0
            if _number(value, 0, 2**63) is not None:
                acked.append((name, str(size)))
        elif name == "timeout":  # RFC 2349 "Timeout Interval Option": 1..255 seconds
            number = _number(value, 1, 255)
            if number is not None and number <= max_timeout:
                timeout = float(number)
                acked.append((name, str(number)))
        elif name == "windowsize":  # RFC 7440 section 3: 1..65535 blocks
            number = _number(value, 1, 65535)
            if number is not None:
                windowsize = min(number, max_windowsize)
                acked.append((name, str(windowsize)))
    return Negotiated(blksize, windowsize, timeout, tuple(acked))


class SourceError(Exception):
    """The file changed under a transfer (it shrank, or became unreadable)."""


class FileSource:
    """Reads a file of fixed ``size`` by offset, a chunk at a time, with ``os.pread``.

    Not mmap: a file truncated while it is being served would kill the agent with SIGBUS.
    """

    def __init__(self, fd: int, size: int, chunk: int = _CHUNK) -> None:
        self.fd = fd
        self.size = size
        self._chunk = chunk
        self._start = 0
        self._view = memoryview(b"")

    def read(self, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` (the caller keeps within ``size``)."""
        start = offset - self._start
        if start >= 0 and start + length <= len(self._view):
            return self._view[start : start + length]
        want = min(max(self._chunk, length), self.size - offset)
        try:
            data = os.pread(self.fd, want, offset)
        except OSError as exc:
            raise SourceError(f"cannot read: {exc.strerror}") from exc
        if len(data) < want:
            raise SourceError("file shrank during the transfer")
        self._start = offset
        self._view = memoryview(data)
        return self._view[:length]

    def read_into(self, slots: list[memoryview], offset: int) -> None:
        """Fill ``slots`` (payload places in a packet buffer) from ``offset`` in one
        ``preadv``: a window's blocks go from the page cache into their datagrams with no
        copy or allocation per block."""
        want = sum(len(slot) for slot in slots)
        try:
            got = os.preadv(self.fd, slots, offset)
        except OSError as exc:
            raise SourceError(f"cannot read: {exc.strerror}") from exc
        if got < want:
            raise SourceError("file shrank during the transfer")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BytesSource:
    """An in-memory payload (netascii-converted files)."""

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self._view = memoryview(data)

    def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]

    def close(self) -> None:
        self._view.release()


Source = FileSource | BytesSource


def to_netascii(data: bytes) -> bytes:
    """RFC 1350 section 5 (netascii, per RFC 764): LF -> CR LF, a bare CR -> CR NUL."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


class State(enum.Enum):
    OACK_SENT = "waiting for the ACK of the OACK"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


class ReadTransfer:
    """The server side of one RRQ, from OACK (or first DATA) to the final ACK.

    - RFC 2347: with options, send OACK and wait for ACK 0 (an ERROR ends the transfer).
    - RFC 1350 section 6: the last block is shorter than blksize (possibly empty); the
      transfer is done when it is acknowledged.
    - RFC 7440 section 4: send ``windowsize`` blocks, wait for an ACK; an ACK of block k
      starts the next window at k+1, whether k ends the window or reports a gap inside it.
    - RFC 1123 section 4.2.3.1 (Sorcerer's Apprentice): a duplicate ACK never triggers a
      retransmission in lock-step; in windowed mode the first duplicate of an ACK is the
      receiver's loss report and resends the window once.
    - Timeouts resend the outstanding OACK or window, up to ``retries`` times, then give up.
    """

    def __init__(
        self,
        source: Source,
        send: Callable[[bytes], object],
        *,
        send_batch: Callable[[memoryview, int], object] | None = None,
        blksize: int = DEFAULT_BLKSIZE,
        windowsize: int = 1,
        timeout: float = 1.0,
        retries: int = 5,
        oack: Options = (),
    ) -> None:
        self.source = source
        self._send = send
        # Batches only pay off with several packets per call and a kernel limit of ~64 KiB.
        self._per_batch = min(_BATCH_SEGMENTS, _BATCH_BYTES // (blksize + 4))
        self._batch = send_batch if windowsize > 1 and self._per_batch > 1 else None
        self._buffer: bytearray | None = None
        # Windowed from a file: the next window's first batch, built ahead into a buffer of
        # its own while the client reads this window (see ``_build_window_ahead``); it is
        # ``next_packet`` then, and ``_ahead_last`` its last block (0: none built).
        self._ahead_buffer: bytearray | None = None
        self._ahead_slots: list[memoryview] = []
        self._ahead_first = self._ahead_last = 0
        self.blksize = blksize
        self.windowsize = windowsize
        self.timeout = timeout
        self.retries = retries
        self._oack = OACK(oack).encode() if oack else b""
        self.size = source.size
        self._read = source.read
        self.last_block = source.size // blksize + 1
        self.acked = 0  # highest block the client acknowledged
        self.sent = 0  # highest block sent so far
        self._resent_for = -1  # duplicate ACK already answered (windowed mode)
        # What is built ahead (public for the hot path: sent when ACK ``release_on``
        # arrives, see ``released``): in lock-step the next packet (and its block number),
        # in windowed mode the next window's first batch (sent with ``send_batch``).
        self.next_packet: bytes | memoryview = b""
        self._next_block = -1
        # The hot path (``released``): the 16-bit ACK number that releases what is built
        # ahead, or -1 when nothing is ready or the state forbids it.
        self.release_on = -1
        self._slots: list[memoryview] = []  # windowed from a file: payload places in _buffer
        self._tries = 0
        self.timeouts = 0  # retransmissions after a timeout, over the whole transfer
        self.state = State.SENDING
        self.deadline = 0.0
        self.error: str | None = None  # why the transfer failed

    @property
    def finished(self) -> bool:
        return self.state is State.DONE or self.state is State.FAILED

    @property
    def answered(self) -> bool:
        """Whether the client answered the first packet: ACK 0 of the OACK, or ACK 1. Until
        then its address may be forged, so the server gives it no transfer slot."""
        return self.acked >= 1 or (bool(self._oack) and self.state is not State.OACK_SENT)

    def start(self, now: float) -> None:
        self.deadline = now + self.timeout
        if self._oack:
            self.state = State.OACK_SENT
            self._send(self._oack)
        else:
            self._send_window(1)

    def _send_window(self, first: int) -> None:
        last = min(first + self.windowsize - 1, self.last_block)
        batch = self._batch
        try:
            if batch is None or first == last:
                self._send_singly(first, last)
            else:
                if first == self._ahead_first:  # its first batch was built ahead
                    batch(memoryview(self.next_packet), self.blksize + 4)
                    first = self._ahead_last + 1
                if first <= last:
                    self._send_batches(first, last)
        except SourceError as exc:
            self._abort(ErrorCode.NOT_DEFINED, str(exc))
            return
        self.sent = last
        if batch is not None:
            self._build_window_ahead()

    def _send_singly(self, first: int, last: int) -> None:
        blksize, size, read, send = self.blksize, self.source.size, self.source.read, self._send
        pack = _DATA_HEADER.pack
        for block in range(first, last + 1):
            offset = (block - 1) * blksize
            send(pack(OP_DATA, block & 0xFFFF) + read(offset, min(blksize, size - offset)))

    def _send_batches(self, first: int, last: int) -> None:
        """Packets laid end to end in one buffer, each ``segment`` bytes but the file's last.

        The send_batch callable hands a whole buffer to the kernel at once (UDP GSO on
        Linux: one syscall for up to ``_BATCH_SEGMENTS`` datagrams). From a file, each
        batch's payloads are read straight into their places with one ``preadv``; only the
        4-byte headers are written per block.
        """
        assert self._batch is not None
        blksize, size = self.blksize, self.source.size
        segment = blksize + 4
        per_batch = self._per_batch
        if self._buffer is None:
            self._buffer, self._slots = self._batch_buffer()
        buf = self._buffer
        view = memoryview(buf)
        pack_into = _DATA_HEADER.pack_into
        source = self.source
        block = first
        while block <= last:
            end = min(block + per_batch - 1, last)
            if isinstance(source, FileSource):
                self._batch(self._fill(buf, self._slots, block, end), segment)
                block = end + 1
                continue
            tail = min(blksize, size - (end - 1) * blksize)  # the batch's last payload
            pos = 0
            for b in range(block, end + 1):
                length = blksize if b != end else tail
                pack_into(buf, pos, OP_DATA, b & 0xFFFF)
                view[pos + 4 : pos + 4 + length] = source.read((b - 1) * blksize, length)
                pos += segment
            self._batch(view[: (end - block) * segment + 4 + tail], segment)
            block = end + 1

    def _batch_buffer(self) -> tuple[bytearray, list[memoryview]]:
        """A buffer for one batch of packets, and the places of their payloads in it."""
        segment = self.blksize + 4
        count = min(self._per_batch, self.windowsize)
        buffer = bytearray(segment * count)
        whole = memoryview(buffer)
        return buffer, [whole[i * segment + 4 : (i + 1) * segment] for i in range(count)]

    def _fill(self, buf: bytearray, slots: list[memoryview], first: int, end: int) -> memoryview:
        """Blocks ``first``..``end`` (one batch) from the file into ``buf``: the payloads
        with one ``preadv`` into ``slots``, then the headers; return the batch to send.

        :raise SourceError: the file shrank or cannot be read.
        """
        assert isinstance(self.source, FileSource)
        blksize, segment, count = self.blksize, self.blksize + 4, end - first + 1
        tail = min(blksize, self.size - (end - 1) * blksize)  # the batch's last payload
        places = slots[:count]
        if tail != blksize:
            places[-1] = places[-1][:tail]
        self.source.read_into(places, (first - 1) * blksize)
        pack_into = _DATA_HEADER.pack_into
        for i in range(count):
            pack_into(buf, i * segment, OP_DATA, (first + i) & 0xFFFF)
        return memoryview(buf)[: (count - 1) * segment + 4 + tail]

    def _build_window_ahead(self) -> None:
        """Windowed, from a file, once a window is out: build the next window's first batch
        now, while the client reads this one, and arm the hot path for the ACK that ends
        this window. That ACK then costs one ``send_batch`` before anything else (the round
        trip is the whole cost of a window, as of a block in lock-step)."""
        self.release_on = -1
        self._ahead_first = self._ahead_last = 0
        first = self.sent + 1
        last = min(first + self.windowsize - 1, self.last_block)
        if (
            self._batch is None
            or not isinstance(self.source, FileSource)
            or self.state is not State.SENDING
            or first >= last  # nothing left, or a one-block window: it goes out singly
        ):
            return
        if self._ahead_buffer is None:
            self._ahead_buffer, self._ahead_slots = self._batch_buffer()
        end = min(first + self._per_batch - 1, last)
        try:
            self.next_packet = self._fill(self._ahead_buffer, self._ahead_slots, first, end)
        except SourceError:
            return  # reported when the window is really due
        self._ahead_first, self._ahead_last = first, end
        self.release_on = self.sent & 0xFFFF

    def abort(self, code: ErrorCode, message: str) -> None:
        """End the transfer with ``message`` sent to the client (RFC 1350 section 7)."""
        self._abort(code, message)

    def _abort(self, code: ErrorCode, message: str) -> None:
        self.release_on = -1
        self.state = State.FAILED
        self.error = message
        self._send(ERROR(code, message).encode())

    def on_datagram(self, data: bytes | memoryview, now: float) -> None:
        """A datagram from the client's TID."""
        if len(data) == 4 and data[0] == 0 and data[1] == OP_ACK:  # the hot path
            self.on_ack((data[2] << 8) | data[3], now)
            return
        try:
            packet = decode(data)
        except PacketError:
            return  # garbage: ignored, never answered
        if isinstance(packet, ERROR):  # RFC 1350 section 7: not acknowledged
            self.release_on = -1
            self.state = State.FAILED
            self.error = f"client sent error {packet.code}: {packet.message}"
        elif not self.finished:
            self._abort(ErrorCode.ILLEGAL_OPERATION, f"unexpected {type(packet).__name__}")

    def on_ack(self, block: int, now: float) -> None:
        sent = self.sent
        if block == sent & 0xFFFF and sent > self.acked and self.state is State.SENDING:
            # The usual case, kept short: the last block sent is acknowledged.
            self.acked = sent
            self._tries = 0
            self.deadline = now + self.timeout
            if sent >= self.last_block:
                self.state = State.DONE
            elif self.windowsize == 1:
                self._send_block(sent + 1)
            else:
                self._send_window(sent + 1)
            return
        if self.state is State.OACK_SENT:
            if block == 0:
                self.state = State.SENDING
                self._tries = 0
                self.deadline = now + self.timeout
                self._send_window(1)
            return
        if self.state is not State.SENDING:
            return
        # The absolute block this 16-bit number stands for, counting back from the last sent.
        acked = sent - ((sent - block) & 0xFFFF)
        if acked < self.acked:
            return  # older than what is already acknowledged: a delayed duplicate
        if acked == self.acked:
            if self.windowsize > 1 and self._resent_for != acked:
                self._resent_for = acked
                self._send_window(acked + 1)
            return
        # A gap inside the window (RFC 7440 section 4): resume right after the ACK.
        self.acked = acked
        self._tries = 0
        self.deadline = now + self.timeout
        self._send_window(acked + 1)

    def _send_block(self, block: int) -> None:
        """Lock-step: one DATA packet, then the next one is built while the client answers
        (off the round trip's critical path)."""
        if block == self._next_block:
            packet = self.next_packet
            assert isinstance(packet, bytes)  # in lock-step, what is built ahead is a packet
        else:
            try:
                packet = self._packet(block)
            except SourceError as exc:
                self._abort(ErrorCode.NOT_DEFINED, str(exc))
                return
        self._send(packet)
        self.sent = block
        self._build_ahead(block)

    def _build_ahead(self, block: int) -> None:
        """``block`` was just sent: build the next one, and arm the hot path for it."""
        self._next_block = self.release_on = -1
        if block < self.last_block:
            try:
                self.next_packet = self._packet(block + 1)
            except SourceError:
                return  # reported when the block is really due
            self._next_block = block + 1
            # Never armed for the ACK of the last block: that one ends the transfer (on_ack).
            self.release_on = block & 0xFFFF

    def released(self, now: float) -> None:
        """The hot path, after the caller saw ACK ``release_on`` from the client and sent
        ``next_packet`` at once (with ``send`` in lock-step, with ``send_batch`` in windowed
        mode): the bookkeeping ``on_ack`` would have done first, then the rest of the window
        and what is built ahead next. The caller sends before calling this, so none of it
        lies on the round trip."""
        self.acked = self.sent
        self._tries = 0
        self.deadline = now + self.timeout
        if self.windowsize == 1:
            block = self.sent + 1
            self.sent = block
            self._build_ahead(block)
            return
        first, last = self._ahead_last + 1, min(self.sent + self.windowsize, self.last_block)
        self._ahead_first = 0  # sent
        if first <= last:
            try:
                self._send_batches(first, last)
            except SourceError as exc:
                self._abort(ErrorCode.NOT_DEFINED, str(exc))
                return
        self.sent = last
        self._build_window_ahead()

    def _packet(self, block: int) -> bytes:
        offset = (block - 1) * self.blksize
        payload = self._read(offset, min(self.blksize, self.size - offset))
        return _DATA_HEADER.pack(OP_DATA, block & 0xFFFF) + payload

    def on_timeout(self, now: float) -> None:
        if self.finished:
            return
        self._tries += 1
        self.timeouts += 1
        if self._tries > self.retries:
            self.release_on = -1
            self.state = State.FAILED
            self.error = f"no answer after {self.retries} retransmissions"
            return
        self.deadline = now + self.timeout
        if self.state is State.OACK_SENT:
            self._send(self._oack)
        else:
            self._send_window(self.acked + 1)
