"""Boot artefacts sent with sendfile(2) from one thread of their own, off the event loop.

Why: asyncio's ``loop.sendfile`` runs each ``sendfile`` call on the event loop, one per
"socket writable" event, re-arming the writer each time. With a rack of machines pulling
150 MB images at once, every turn of the loop does tens of multi-megabyte kernel copies, and
everything else the agent does on that loop — its API over mutual TLS, DHCP, the metadata
service — waits behind them (a ``/healthz`` took over half a second at 50 machines). One
pump thread does the sending instead: it waits for writable sockets on an epoll of its own,
calls ``sendfile`` with the GIL released, and hands each finished transfer back to the loop.
A single stream is faster too: no loop iteration and no epoll re-arm per socket buffer.
Each socket gets at most ``MAX_CALL`` bytes per turn, so 50 machines share the link fairly
and the last of them is not left waiting.

The pump only ever uses a socket while the coroutine that handed it over awaits the
transfer: a cancelled transfer (the connection was closed, the agent stops) is withdrawn
under the job's lock before the cancellation goes on, so the thread can never call
``sendfile`` on a descriptor the event loop has closed and perhaps reused.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import selectors
import sys
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# At most this much per sendfile call, then the next socket's turn (nginx's
# sendfile_max_chunk): on loopback or a fast link the receiver drains while the kernel
# copies, so one uncapped call can feed one machine for a long time while the others wait.
MAX_CALL = 2 << 20
# The pump needs the GIL for microseconds after each syscall, but while the loop thread runs
# Python (a TLS handshake of the API, a DHCP answer) it waits up to the interpreter's switch
# interval each time: 5 ms by default, so 50 sockets' turns could take a quarter second.
# Lowered for the whole process (never raised). Boot storm of 50 machines with the API
# polled, two interleaved A/B pairs each: 0.5 ms gave 0.97-1.17x nginx's time to the last
# image, 5 ms 1.06-1.56x.
SWITCH_INTERVAL = 0.0005


class PumpStopped(ConnectionResetError):
    """The pump stopped before the transfer ended (the agent is shutting down)."""


@dataclass(eq=False, slots=True)
class _Job:
    sock: int
    file: int
    offset: int
    left: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: bool = False
    registered: bool = False


class SendfilePump:
    """``await send(sock_fd, file_fd, offset, count)`` from any event loop; ``start`` and
    ``stop`` (idempotent) from the loop that owns the sockets."""

    def __init__(self, name: str = "sendfile pump") -> None:
        self.name = name
        self._selector: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = -1, -1
        self._incoming: collections.deque[_Job] = collections.deque()
        self._withdrawn: collections.deque[_Job] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread; transfers still under way fail with ``PumpStopped``."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join()
        assert self._selector is not None
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    async def send(self, sock: int, file: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``file`` from ``offset`` to the non-blocking socket
        ``sock``; raises the ``OSError`` sendfile gave (the peer went away...), or
        ``ConnectionResetError`` if the file ended early or the pump stopped."""
        if count <= 0:
            return
        if self._thread is None:
            raise PumpStopped("the sendfile pump is not running")
        loop = asyncio.get_running_loop()
        job = _Job(sock, file, offset, count, loop, loop.create_future())
        self._incoming.append(job)
        self._wake()
        try:
            await job.future
        except asyncio.CancelledError:
            # Withdraw before the caller's transport may close the socket: once we hold
            # the lock, the thread is not inside sendfile on it and never will be again.
            with job.lock:
                job.cancelled = True
            self._withdrawn.append(job)
            self._wake()
            raise

    # --- the pump thread ---------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake: the pipe is full of wake-ups

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        while not self._stopping:
            for key, _ in selector.select():
                if key.data is None:
                    self._drain_wake()
                else:
                    self._progress(key.data)
        for key in list(selector.get_map().values()):
            if key.data is not None:
                self._finish(key.data, PumpStopped("the sendfile pump stopped"))
        while self._incoming:
            self._finish(self._incoming.popleft(), PumpStopped("the sendfile pump stopped"))

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        # Withdrawals first: a new job may reuse the descriptor number of a withdrawn one.
        while self._withdrawn:
            job = self._withdrawn.popleft()
            self._unregister(job)
        while self._incoming and not self._stopping:
            self._progress(self._incoming.popleft())

    def _progress(self, job: _Job) -> None:
        """One sendfile call of at most ``MAX_CALL`` bytes, then the next socket's turn: the
        job stays registered (level-triggered) until it ends."""
        with job.lock:
            if job.cancelled:
                return  # its withdrawal unregisters it
            try:
                sent = os.sendfile(job.sock, job.file, job.offset, min(job.left, MAX_CALL))
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._finish(job, exc)
                return
            else:
                if sent == 0:  # EOF of the file: it shrank under us
                    self._finish(job, ConnectionResetError("the file ended early"))
                    return
            job.offset += sent
            job.left -= sent
            if job.left == 0:
                self._finish(job, None)
            elif not job.registered:
                assert self._selector is not None
                self._selector.register(job.sock, selectors.EVENT_WRITE, job)
                job.registered = True

    def _unregister(self, job: _Job) -> None:
        if job.registered:
            job.registered = False
            assert self._selector is not None
            try:
                self._selector.unregister(job.sock)
            except (KeyError, ValueError):
                pass

    def _finish(self, job: _Job, exc: BaseException | None) -> None:
        self._unregister(job)
        try:
            job.loop.call_soon_threadsafe(_resolve, job.future, exc)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more


def _resolve(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
