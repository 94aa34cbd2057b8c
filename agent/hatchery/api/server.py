"""The API's listeners: the node's address, and one socket per metadata namespace.

The agent serves one app (``api.app.make_app``) on ``listen_host:listen_port`` and, inside
every bridge's metadata namespace, on 169.254.169.254 at the same port; all of them speak
mutual TLS with the same context. This is the only place the agent opens API sockets, so
``agent.py`` only wires and the metadata service only hands over a socket.

All of these sockets are one ``HttpListener``: one set of connection caps and timeouts
(``config.ConnectionLimits``), so a VM holding connections through 169.254.169.254 counts
against the same total as everyone else and cannot starve the node's own address.
"""

from __future__ import annotations

import logging
import socket
import ssl

from aiohttp import web

from hatchery.config import ConnectionLimits
from hatchery.errors import HatcheryError
from hatchery.listener import HttpListener, ListenerError, ListenerStats
from hatchery.metrics import HttpMeter

log = logging.getLogger(__name__)


class ApiServerError(HatcheryError):
    """The API cannot listen where it was asked to."""


class ApiServer:
    """``app`` behind ``tls`` (None only for tests of the app itself); ``close`` is idempotent
    and stops every listener, the metadata namespaces' ones included."""

    def __init__(
        self,
        app: web.Application,
        tls: ssl.SSLContext | None,
        limits: ConnectionLimits | None = None,
        meter: HttpMeter | None = None,
    ) -> None:
        self._listener = HttpListener(app, limits or ConnectionLimits(), tls=tls, name="api",
                                      meter=meter)  # fmt: skip
        self._tls = tls
        self._started = False
        self.port = 0

    @property
    def stats(self) -> ListenerStats:
        """Connections admitted, refused and cut (for tests and benchmarks)."""
        return self._listener.stats

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: any free port, then read ``port``)."""
        await self._listener.start()
        try:
            # SO_REUSEADDR: an agent killed with requests in flight leaves their connections
            # in TIME_WAIT on this port; without it the restarted agent could not listen for
            # a minute. (Linux still refuses a second listener on the same port.)
            self.port = await self._listener.listen(host, port, reuse_address=True)
        except ListenerError as exc:
            await self._listener.close()
            raise ApiServerError(exc.message) from exc
        self._started = True
        log.info("api on %s:%d (%s)", host, self.port, "mutual TLS" if self._tls else "no TLS")

    async def serve_on(self, sock: socket.socket) -> None:
        """Also serve on ``sock``, a listening socket made elsewhere (inside a namespace)."""
        if not self._started:
            raise ApiServerError("the API is not started: it cannot serve on another socket")
        await self._listener.serve_on(sock)

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self._listener.close()
