"""The API's listeners: the node's address, and one socket per metadata namespace.

The agent serves one app (``api.app.make_app``) on ``listen_host:listen_port`` and, inside
every bridge's metadata namespace, on 169.254.169.254 at the same port; all of them speak
mutual TLS with the same context. This is the only place the agent opens API sockets, so
``agent.py`` only wires and the metadata service only hands over a socket.
"""

from __future__ import annotations

import logging
import socket
import ssl

from aiohttp import web

from hatchery.errors import HatcheryError

log = logging.getLogger(__name__)


class ApiServerError(HatcheryError):
    """The API cannot listen where it was asked to."""


class ApiServer:
    """``app`` behind ``tls`` (None only for tests of the app itself); ``close`` is idempotent
    and stops every listener, the metadata namespaces' ones included."""

    def __init__(self, app: web.Application, tls: ssl.SSLContext | None) -> None:
        self._app = app
        self._tls = tls
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: any free port, then read ``port``)."""
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self._tls)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ApiServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])  # what port 0 became
        log.info("api on %s:%d (%s)", host, self.port, "mutual TLS" if self._tls else "no TLS")

    async def serve_on(self, sock: socket.socket) -> None:
        """Also serve on ``sock``, a listening socket made elsewhere (inside a namespace)."""
        if self._runner is None:
            raise ApiServerError("the API is not started: it cannot serve on another socket")
        await web.SockSite(self._runner, sock, ssl_context=self._tls).start()

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
