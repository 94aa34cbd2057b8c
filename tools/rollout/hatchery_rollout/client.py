"""The agent API as the rollout uses it (docs/api.md), over mutual TLS with aiohttp.

One ``ClientSession`` for the whole fleet: the connector caps open connections, so thousands
of hosts share a bounded pool without a thread each. A host's requests follow each other on
one kept-alive connection, and its last one (``close=True``) ends it: an idle TLS connection
holds a few hundred KiB, and ten thousand of them would fill the operator's memory.

TLS sessions are not resumed (measured in docs/benchmarks.md, rollout at scale). While a
host upgrades, its long poll holds its connection; the upgrade restarts the agent (a reboot
always, a live patch whenever the agent's own files change), and a restarted agent has new
ticket keys. Reading a session to keep it costs ~0.3 ms of the tool's CPU per connection
(CPython copies it through DER), more than resuming saves (~0.8 ms) on the one
reconnection left: a baseline taken ahead whose connection idled out before the POST.

Answers are untrusted: anything that does not parse is an ``AgentError`` naming the host,
never a crash. The documents are the agent's own wire schema (``hatchery.wire``), read
tolerantly, and never more than ``MAX_ANSWER_BYTES`` of one: a rollout holds hundreds of
answers at once, and one broken or hostile node must not fill the operator's memory.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from hatchery.client import AnswerTooLarge, read_answer
from hatchery.wire import Health, UpgradeRequest, UpgradeStatus
from hatchery_rollout.errors import AgentError
from hatchery_rollout.inventory import Host

# An upgrade status or health answer is a few hundred bytes.
MAX_ANSWER_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ImageListing:
    """A host's image store (``GET /v1/images``): usable versions and their sizes in bytes.
    A version whose manifest the agent cannot read is left out: it cannot be installed."""

    sizes: Mapping[str, int]

    @classmethod
    def from_json(cls, data: object) -> ImageListing:
        images = data.get("images") if isinstance(data, Mapping) else None
        if not isinstance(images, list):
            raise ValueError("no images list")
        sizes: dict[str, int] = {}
        for entry in images:
            if not isinstance(entry, Mapping) or entry.get("error") is not None:
                continue
            version, size = entry.get("version"), entry.get("size")
            if isinstance(version, str) and isinstance(size, int) and not isinstance(size, bool):
                sizes[version] = size
        return cls(sizes)


_CLOSE = {"Connection": "close"}
FETCH_SECONDS = 1800.0  # an image fetch between peers: hundreds of MB over a busy network


@dataclass(frozen=True, slots=True)
class PostResult:
    status: int
    upgrade: UpgradeStatus


class AgentClient:
    """Talks to every agent of the fleet through one bounded connection pool."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        connections: int = 256,
        request_timeout: float = 10.0,
        keepalive: float | None = 2.0,
    ) -> None:
        self._context = context
        self._keepalive = keepalive
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> AgentClient:
        # Every idle TLS connection costs about 300 KiB of buffers (asyncio's SSL protocol
        # and OpenSSL's): a host's last request closes its connection (``close``), and one
        # left idle otherwise (a poll that sleeps) goes after ``keepalive`` seconds, or at
        # once (keepalive None: one request per connection).
        if self._keepalive is None:
            connector = aiohttp.TCPConnector(
                ssl=self._context, limit=self._connections, force_close=True
            )
        else:
            connector = aiohttp.TCPConnector(
                ssl=self._context, limit=self._connections, keepalive_timeout=self._keepalive
            )
        # No cookie jar: agents set none, and one agent's cookie must never reach another.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar()
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self,
        host: Host,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        extra_time: float = 0.0,
        close: bool = False,
    ) -> tuple[int, Any]:
        if self._session is None:
            raise RuntimeError("AgentClient used outside 'async with'")
        url = f"https://{host.address}{path}"
        self.requests += 1
        try:
            timeout = (
                aiohttp.ClientTimeout(total=(self._timeout.total or 0) + extra_time)
                if extra_time
                else None
            )
            headers = _CLOSE if close else None
            async with self._session.request(
                method, url, json=body, timeout=timeout, headers=headers
            ) as resp:
                text = (await read_answer(resp, MAX_ANSWER_BYTES)).decode(errors="replace")
                status = resp.status
        except AnswerTooLarge as exc:
            raise AgentError(f"{host.name} ({host.address}): {method} {path}: {exc}") from exc
        except (TimeoutError, aiohttp.ClientError, ssl.SSLError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise AgentError(f"{host.name} ({host.address}): {method} {path}: {detail}") from exc
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = None
        if status >= 400:
            # The agent's one error body: {"error", "field", "hint"} (docs/api.md).
            message = data.get("error") if isinstance(data, Mapping) else None
            hint = data.get("hint") if isinstance(data, Mapping) else None
            raise AgentError(
                f"{host.name}: {method} {path}: HTTP {status}: {message or text[:200] or '-'}",
                hint=hint if isinstance(hint, str) else None,
                status=status,
            )
        return status, data

    async def health(self, host: Host, *, close: bool = False) -> Health:
        """``GET /healthz``; ``close``: the host's last request for now (its connection ends)."""
        _, data = await self._call(host, "GET", "/healthz", close=close)
        try:
            return Health.from_json(data)
        except ValueError as exc:
            raise AgentError(f"{host.name}: GET /healthz: bad answer: {exc}") from exc

    async def images(self, host: Host, *, close: bool = False) -> ImageListing | None:
        """The host's image store; None if the agent has no image routes (no store)."""
        try:
            _, data = await self._call(host, "GET", "/v1/images", close=close)
        except AgentError as exc:
            if exc.status == 404:
                return None
            raise
        try:
            return ImageListing.from_json(data)
        except ValueError as exc:
            raise AgentError(f"{host.name}: GET /v1/images: bad answer: {exc}") from exc

    async def fetch_image(self, host: Host, peer: str, version: str) -> None:
        """``POST /v1/images/fetch``: the host fetches ``version`` from the agent at ``peer``."""
        body = {"peer": peer, "version": version}
        await self._call(host, "POST", "/v1/images/fetch", body, extra_time=FETCH_SECONDS)

    async def upgrade(self, host: Host, request: UpgradeRequest) -> PostResult:
        status, data = await self._call(host, "POST", "/v1/upgrade", request.to_json())
        return PostResult(status, UpgradeStatus.from_json(data))

    async def upgrade_status(self, host: Host, wait: float = 0.0) -> UpgradeStatus:
        """``GET /v1/upgrade``; with ``wait``, the agent may hold the answer until the upgrade
        is no longer running or ``wait`` seconds passed (an agent without it answers at once).
        """
        path = f"/v1/upgrade?wait={wait:g}" if wait > 0 else "/v1/upgrade"
        _, data = await self._call(host, "GET", path, extra_time=wait)
        return UpgradeStatus.from_json(data)
