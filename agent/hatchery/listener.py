"""The one way the agent serves an aiohttp app on a socket: with connection and time limits.

The API (on the node's address and inside every metadata namespace), the metadata service
and boot HTTP all listen through ``HttpListener``, so every HTTP listener has the same
limits (``config.ConnectionLimits``):

- **Per-client and total connection caps.** We accept connections ourselves
  (``loop.sock_accept``) instead of letting ``loop.create_server`` do it, so a connection
  over a cap is closed right at accept: no TLS handshake, no aiohttp handler, no task, no
  log line. asyncio's own accept loop would also log an ERROR for every ``accept()`` that
  fails with EMFILE; ours counts it and backs off.
- **Idle keep-alive timeout.** aiohttp's ``keepalive_timeout`` (default one hour) is set to
  ``idle_timeout``. aiohttp arms that timer at connection start and re-arms it after each
  response, and it fires whenever no complete request has arrived, so it also bounds how
  long a later request's headers may take.
- **Header timeout (slowloris).** aiohttp has no header-read timeout, so each connection
  gets a timer at accept (``ssl_handshake_timeout`` for TLS, then our own) that aborts it
  unless its first request's headers are complete within ``header_timeout``. Completion is
  seen through the server's public ``request_factory`` hook, called once per parsed request.
- **A quiet log under attack.** Refusals, header timeouts, accept errors and malformed
  requests (which aiohttp would log with a traceback each) are counted and
  written as at most one WARNING line per ``log_interval`` (and one at close), never one
  line per connection: an attacker must not be able to flood the journal (issue 14 saw
  ~500k lines in 22 s).
- **Counted.** With a ``meter`` (``hatchery.metrics.HttpMeter``), every answer is counted by
  route pattern and status as its headers go out (``on_response_prepare``: the status is
  final there, a range request's 206 and an error turned into an answer included), with
  the time since the request reached the outermost middleware. Files sent whole add their
  size (``count_sent``).
- **A client that leaves mid-answer is no error.** aiohttp does not cancel a handler whose
  client left (a handler cut at any ``await`` could leave half a change behind), so a
  handler still writing (a followed log, a console tail, an image or a container bundle
  being downloaded) gets a ``ConnectionError``, which aiohttp logs at ERROR with a
  traceback, and the API as an internal error. Anyone who can open a connection could
  repeat that at will. A middleware innermost around every handler turns it, when the
  client's connection is really gone, into a count (``left_mid_answer``) and a DEBUG line;
  the answer is counted once, by the status it started with (or 499 if none went out).
- **A bounded stop.** ``close`` gives the answers in flight ``stop_grace`` seconds to end,
  then cuts them; aiohttp's default is 60 s, twice over (to end, then once cancelled), more
  than systemd waits before it kills the agent. ``STOP_GRACE`` (10 s) by default: an upload
  or a peer's fetch cut short is asked again (uploads are whole or not at all; a fetch
  resumes); answers held open end at once (``api.http.STOPPING``). The metadata service
  gives ``VM_STOP_GRACE`` (60 s, as before): a container VM's image download is not asked
  again by the VM, so one under way is let finish.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler

from hatchery.config import ConnectionLimits
from hatchery.errors import HatcheryError
from hatchery.log import EventSummary
from hatchery.metrics import HttpMeter

log = logging.getLogger(__name__)

#: How long the accept loop pauses after accept() fails (EMFILE, ENFILE, ENOBUFS): the
#: kernel keeps the connection queued; retrying at once would spin the loop.
ACCEPT_BACKOFF = 0.1
#: Seconds ``close`` waits for the answers in flight before it cuts them (see above).
STOP_GRACE = 10.0
VM_STOP_GRACE = 60.0


HTTP_METER = web.AppKey("http_meter", HttpMeter)
_Handler = Any  # aiohttp's handler type: (web.Request) -> Awaitable[web.StreamResponse]


def _route(request: web.Request) -> str:
    """The matched route's pattern (``/v1/vms/{name}``): bounded, never a client's path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "other"


_STARTED = web.RequestKey("hatchery_started", float)
_COUNTED = web.RequestKey("hatchery_counted", bool)
#: The status counted for a request whose client left before any answer went out (nginx's).
CLIENT_LEFT = 499


def client_left(request: web.BaseRequest) -> bool:
    """Whether ``request``'s client has gone: its connection is closed or closing."""
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def _note_start(request: web.Request, handler: _Handler) -> web.StreamResponse:
    request[_STARTED] = time.perf_counter()
    response: web.StreamResponse = await handler(request)
    return response


async def _count_answer(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the status is final here (a range request's 206 is set as
    ``FileResponse`` prepares), errors turned into answers included."""
    if request.get(_COUNTED):  # a second answer to one request: see ``goodbyes``
        return
    request[_COUNTED] = True
    started = request.get(_STARTED)
    seconds = time.perf_counter() - started if started is not None else 0.0
    request.app[HTTP_METER].answered(_route(request), response.status, seconds)


def count_sent(request: web.BaseRequest, size: int) -> None:
    """A file of ``size`` bytes was sent whole on ``request`` (no-op without a meter)."""
    if isinstance(request, web.Request):
        meter = request.app.get(HTTP_METER)
        if meter is not None:
            meter.sent(size)


class ListenerError(HatcheryError):
    """A listener cannot listen where it was asked to."""


@dataclass
class ListenerStats:
    """What a listener refused or cut, since it started (read by tests and benchmarks)."""

    accepted: int = 0
    over_client_limit: int = 0
    over_total_limit: int = 0
    header_timeouts: int = 0
    accept_errors: int = 0
    left_mid_answer: int = 0
    open: Counter[str] = field(default_factory=Counter)  # client address -> connections

    @property
    def refused(self) -> int:
        return self.over_client_limit + self.over_total_limit

    def outcomes(self) -> dict[str, int]:
        """The counts by outcome, as ``/metrics`` shows them."""
        return {
            "accepted": self.accepted,
            "over_client_limit": self.over_client_limit,
            "over_total_limit": self.over_total_limit,
            "header_timeout": self.header_timeouts,
            "accept_error": self.accept_errors,
            "left_mid_answer": self.left_mid_answer,
        }


def goodbyes(stats: ListenerStats, name: str) -> Middleware:
    """The middleware (innermost: ``HttpListener`` appends it to every app it serves) that
    takes a ``ConnectionError`` from a handler whose client has left as that client's
    goodbye, counted in ``stats``; any other ``ConnectionError`` goes on as before."""

    @web.middleware
    async def goodbye(request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except ConnectionError as exc:
            if not client_left(request):
                raise
            stats.left_mid_answer += 1
            log.debug("%s: %s %s: the client left mid-answer (%s)", name, request.method,
                      request.path, exc)  # fmt: skip
            # Nothing reaches a closed connection: aiohttp's try to send this ends quietly.
            return web.Response(status=CLIENT_LEFT)

    return goodbye


class _RequestLog(logging.Logger):
    """aiohttp's per-connection log for one listener (its handlers' ``logger``).

    aiohttp logs every malformed request (a bad method, a header line over 8 KiB...) with a
    traceback, at ERROR for most kinds: anyone can send one per connection, so those become
    counts in the listener's summary. Anything else (a bug in a handler) goes on to
    aiohttp's own logger as before.
    """

    def __init__(self, listener: HttpListener) -> None:
        super().__init__(f"{__name__}.requests")
        self._listener = listener

    def handle(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            self._listener._event(f"malformed requests ({type(exc).__name__})")
            return
        aiohttp_log = logging.getLogger("aiohttp.server")
        if aiohttp_log.isEnabledFor(record.levelno):
            aiohttp_log.handle(record)


def _idle(handler: RequestHandler) -> bool:
    """Whether aiohttp's handler is waiting for a next request: none queued, none being
    answered. aiohttp has no public word for it; this is the test its own keep-alive timer
    makes (``_process_keepalive``), and tests/unit/agent/test_listener.py checks both sides
    of it against a real half-closing client."""
    waiter: asyncio.Future[None] | None = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()


class _Guarded(asyncio.Protocol):
    """aiohttp's handler for one admitted connection, plus its release and header timer.

    Delegates every protocol callback to the ``RequestHandler`` (which never learns it is
    wrapped: it reads and writes through the transport it is given) and releases the
    connection's place in the caps exactly once, however the connection ends.
    """

    def __init__(
        self, listener: HttpListener, handler: RequestHandler, host: str, sock: int
    ) -> None:
        self._listener = listener
        self.handler = handler
        self.host = host
        self.sock = sock  # the listening socket it came through (its fd): the total's key
        self.made = False
        self._released = False
        # The header deadline runs from accept, so a TLS handshake counts against it.
        self._deadline = asyncio.get_running_loop().time() + listener.limits.header_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self._deadline, self._too_slow)
        self._listener._by_handler[self.handler] = self
        self.handler.connection_made(transport)

    def request_seen(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        self._listener._event("connections cut off by the header timeout", self.host)
        self._listener.stats.header_timeouts += 1
        if self._transport is not None:
            cast(asyncio.Transport, self._transport).abort()

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        """The client has sent all it will send: a half-close, as busybox ``nc`` and many
        HTTP/1.0 scripts do right after their request. aiohttp's handler lets the transport
        close at once, which drops the answer still owed (the appliance VM's metadata fetch
        lost it whenever the FIN arrived before the handler wrote). So while a request is
        queued or being answered, our side stays open, and the handler closes the
        connection once it has answered; with nothing owed, it closes now. TLS has no
        half-close (asyncio closes an SSL transport on EOF whatever we return).
        """
        self.handler.eof_received()
        if self._transport is None or self._transport.get_extra_info("sslcontext") is not None:
            return None
        if _idle(self.handler):
            return None
        self.handler.close()  # no request after this one: close once it is answered
        return True

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.handler.connection_lost(exc)
        finally:
            self.release()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._listener._by_handler.pop(self.handler, None)
        self._listener._release(self.host, self.sock)


class HttpListener:
    """``app`` served on any number of sockets, all behind one set of ``limits``.

    ``await start()`` once, then ``listen(host, port)`` and/or ``serve_on(sock)``;
    ``close()`` stops every socket and connection and is idempotent. The per-client cap
    counts a client address over all of this listener's sockets; the total is per listening
    socket, so the VMs that reach the API through a metadata namespace (one socket per
    bridge) can never fill the place of the operators on the node's own address. ``tls`` (a
    server context) makes every socket speak TLS.
    """

    def __init__(
        self,
        app: web.Application,
        limits: ConnectionLimits,
        *,
        tls: ssl.SSLContext | None = None,
        name: str = "http",
        meter: HttpMeter | None = None,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        if meter is not None:
            app[HTTP_METER] = meter
            app.middlewares.insert(0, _note_start)
            app.on_response_prepare.append(_count_answer)
        self.app = app
        self.limits = limits
        self.stop_grace = stop_grace
        self.tls = tls
        self.name = name
        self.stats = ListenerStats()
        app.middlewares.append(goodbyes(self.stats, name))
        if meter is not None:
            meter.track(self.stats.outcomes)
        self._summary = EventSummary(log, name, limits.log_interval)
        self._runner: web.AppRunner | None = None
        self._sites: list[_LimitedSite] = []
        self._by_handler: dict[RequestHandler, _Guarded] = {}
        self._totals: collections.Counter[int] = collections.Counter()  # per socket

    @property
    def runner(self) -> web.AppRunner:
        if self._runner is None:
            raise ListenerError(f"{self.name} is not started")
        return self._runner

    @property
    def addresses(self) -> list[tuple[Any, ...]]:
        """Where this listener listens (``getsockname()`` of each socket)."""
        return [site.sock.getsockname() for site in self._sites]

    async def start(self) -> None:
        runner = web.AppRunner(
            self.app,
            access_log=None,
            keepalive_timeout=self.limits.idle_timeout,
            logger=_RequestLog(self),
            shutdown_timeout=self.stop_grace,
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        make_request = server.request_factory

        def request_factory(message: Any, payload: Any, protocol: Any, *args: Any) -> Any:
            guarded = self._by_handler.get(protocol)
            if guarded is not None:
                guarded.request_seen()
            return make_request(message, payload, protocol, *args)

        server.request_factory = request_factory
        self._runner = runner

    async def listen(
        self, host: str, port: int, *, reuse_address: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> int:  # fmt: skip
        """Listen on ``host:port`` (port 0: any free port); the port listened on. ``tls``:
        this socket speaks TLS with that context (the listener's own ``tls`` otherwise)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ListenerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        await self.serve_on(sock, tls=tls)
        return int(sock.getsockname()[1])

    async def serve_on(self, sock: socket.socket, *, tls: ssl.SSLContext | None = None) -> None:
        """Also serve on ``sock``, a listening socket made elsewhere (inside a namespace)."""
        site = _LimitedSite(self, sock, tls or self.tls)
        await site.start()
        self._sites.append(site)

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()  # stops the sites (accept loops), then the connections
        self._sites.clear()
        self._summary.flush(force=True)

    # --- admission ------------------------------------------------------------------------
    def _admit(self, host: str, sock: int) -> bool:
        limits, stats = self.limits, self.stats
        if self._totals[sock] >= limits.total:
            stats.over_total_limit += 1
            self._event("connections refused over the total limit", host)
            return False
        if stats.open[host] >= limits.per_client:
            stats.over_client_limit += 1
            self._event("connections refused over the per-client limit", host)
            return False
        self._totals[sock] += 1
        stats.open[host] += 1
        stats.accepted += 1
        return True

    def _release(self, host: str, sock: int) -> None:
        self._totals[sock] -= 1
        left = self.stats.open[host] - 1
        if left > 0:
            self.stats.open[host] = left
        else:
            del self.stats.open[host]

    def _event(self, what: str, source: str = "") -> None:
        self._summary.count(what, source)

    def _accept_error(self, exc: OSError) -> None:
        self.stats.accept_errors += 1
        self._event(f"accept errors ({exc.strerror or exc})")


_BACKLOG = 1024  # the kernel's queue ahead of our accept loop (capped by somaxconn)


class _LimitedSite(web.BaseSite):
    """A site of ``listener``'s runner on one listening socket, accepting through the caps.

    A ``web.BaseSite`` so the runner stops it like its own sites; its "server" is the accept
    loop task (``_AcceptLoop``), which has what the runner reads of an asyncio server.
    """

    def __init__(
        self, listener: HttpListener, sock: socket.socket, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(listener.runner, ssl_context=tls)
        self.listener = listener
        self.sock = sock
        self.tls = tls
        host, port = sock.getsockname()[:2]
        self._name = f"{'https' if tls else 'http'}://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        self.sock.setblocking(False)
        self._server = _AcceptLoop(self.listener, self.sock, self.tls)


class _AcceptLoop(asyncio.AbstractServer):
    """Accepts on one socket, admits through the listener's caps, hands over to aiohttp
    (after a TLS handshake with ``tls``, when given)."""

    def __init__(
        self, listener: HttpListener, sock: socket.socket, tls: ssl.SSLContext | None
    ) -> None:
        self._listener = listener
        self._sock = sock
        self._tls = tls
        self._connecting: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._run(), name=f"accept {listener.name} {sock.getsockname()[:2]}"
        )

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._task is not None else ()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: the connection waits in the queue
                listener._accept_error(exc)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            host = str(addr[0])
            if not listener._admit(host, self._sock.fileno()):
                conn.close()
                continue
            try:
                conn.setblocking(False)
                server = listener.runner.server
                assert server is not None
                guarded = _Guarded(listener, server(), host, self._sock.fileno())
            except Exception:  # a bug must not end the accept loop: drop this connection
                log.exception("%s: cannot take a connection from %s", listener.name, host)
                conn.close()
                listener._release(host, self._sock.fileno())
                continue
            if self._tls is None:
                await self._connect(conn, guarded)  # no handshake: returns at once
            else:
                # The TLS handshake takes round trips: never hold the accept loop for it.
                task = loop.create_task(self._connect(conn, guarded))
                self._connecting.add(task)
                task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, guarded: _Guarded) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        try:
            await loop.connect_accepted_socket(
                lambda: guarded,
                conn,
                ssl=self._tls,
                ssl_handshake_timeout=listener.limits.header_timeout if self._tls else None,
            )
        except asyncio.CancelledError:
            if not guarded.made:
                guarded.release()  # asyncio closed the transport, and with it the socket
            raise
        except Exception as exc:  # the handshake failed or timed out: nothing to log each time
            if not guarded.made:
                guarded.release()
            if not isinstance(exc, OSError | ssl.SSLError):
                listener._event(f"failed connections ({type(exc).__name__})")

    def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        for pending in list(self._connecting):
            pending.cancel()
        with contextlib.suppress(OSError, ValueError):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        with contextlib.suppress(OSError):
            self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._connecting, return_exceptions=True)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def is_serving(self) -> bool:
        return self._task is not None

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        raise NotImplementedError("the accept loop serves from its creation")
