"""A client of the agent API over mutual TLS, for the CLI and for tools."""

from __future__ import annotations

import contextlib
import json as jsonlib
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from hatchery.config import API_PORT
from hatchery.errors import HatcheryError
from hatchery.pki import client_context


def config_dir() -> Path:
    """Where a person's Hatchery credentials live: ``$XDG_CONFIG_HOME/hatchery``, else
    ``~/.config/hatchery``. Read at each call, not at import, so a wrapper or a test can set
    the variable; a relative or empty ``XDG_CONFIG_HOME`` is ignored, as the XDG Base
    Directory specification asks."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"
    return base / "hatchery"


class ApiError(HatcheryError):
    """The agent refused or failed a request; ``status`` is the HTTP status (0: no answer),
    ``field`` the request field the agent named as wrong, if any."""

    def __init__(
        self, message: str, status: int, *, hint: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.field = field


# The largest answer a client reads from an agent. Answers are untrusted (a compromised
# or broken node may stream without end); the largest legitimate one, a VM's console tail
# or a listing of hundreds of VMs, is well under this.
MAX_ANSWER_BYTES = 16 << 20


class AnswerTooLarge(ValueError):
    """An agent's answer went past the reader's limit; nothing past it was read."""


async def read_answer(resp: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The body of ``resp``, read up to ``limit`` bytes; more than that raises
    ``AnswerTooLarge`` instead of holding the rest in memory."""
    if resp.content_length is not None and resp.content_length > limit:
        raise AnswerTooLarge(f"answer of {resp.content_length} bytes, over {limit}")
    body = await resp.content.read(limit + 1)
    while len(body) <= limit:  # read(n) returns what is buffered; keep going to EOF or limit
        more = await resp.content.read(limit + 1 - len(body))
        if not more:
            return body
        body += more
    raise AnswerTooLarge(f"answer over {limit} bytes")


def decode_answer(raw: bytes, content_type: str) -> Any:
    """JSON when the agent says so (and it parses), else text: what ``request`` returns."""
    text = raw.decode("utf-8", errors="replace")
    if content_type == "application/json":
        try:
            return jsonlib.loads(text)
        except ValueError:
            return text
    return text


def error_from_answer(status: int, body: Any) -> ApiError:
    """The agent's error body ``{"error", "field", "hint"}`` (docs/api.md) as an ``ApiError``
    whose hint the CLIs print; a body of another shape (a proxy's page) is shown as text."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        hint, field = body.get("hint"), body.get("field")
        return ApiError(
            f"{body['error']} (HTTP {status})",
            status,
            hint=hint if isinstance(hint, str) else None,
            field=field if isinstance(field, str) else None,
        )
    text = str(body).strip()[:500] or "no error message"
    return ApiError(f"{text} (HTTP {status})", status)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A client's mutual-TLS files: the fleet CA, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_env(
        cls, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
    ) -> Credentials:
        """The one lookup of the CLIs' credentials (``hatchery``, ``hatchery-rollout``): each
        file from its flag, else ``$HATCHERY_CA``/``_CERT``/``_KEY``, else ``ca.pem``,
        ``client.pem``, ``client.key`` in ``config_dir()``. Nothing is read here: a missing
        file is reported when the TLS context is made."""

        def pick(given: Path | None, env: str, default: str) -> Path:
            if given is not None:
                return given
            return Path(os.environ[env]) if os.environ.get(env) else config_dir() / default

        return cls(
            pick(ca, "HATCHERY_CA", "ca.pem"),
            pick(cert, "HATCHERY_CERT", "client.pem"),
            pick(key, "HATCHERY_KEY", "client.key"),
        )

    def context(self) -> ssl.SSLContext:
        """The client TLS context.

        :raise PkiError: a file is missing, unreadable or not a certificate/key.
        """
        return client_context(self.ca, self.cert, self.key)


def agent_url(address: str) -> str:
    """``host``, ``host:port`` or a full URL → the base URL of the agent's API."""
    if address.startswith("https://"):
        return address.rstrip("/")
    if address.startswith("http://"):
        raise HatcheryError("the agent API is HTTPS only", hint=f"use https://{address[7:]}")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return f"https://{address}:{API_PORT}"
    return f"https://{address}"


#: The longest line of a streamed answer (``GET /v1/logs``) a client takes.
MAX_STREAM_LINE = 1 << 20
#: The largest WebSocket message a client takes from an agent (a console sends 4 KiB ones).
MAX_WS_MESSAGE = 64 * 1024


class AgentClient:
    def __init__(
        self, address: str, credentials: Credentials, timeout: float | None = 300.0
    ) -> None:
        """``timeout``: for a whole request, answer included (None: none, for consoles and
        followed logs, which last as long as the operator wants)."""
        self.base = agent_url(address)
        self._ssl = credentials.context()
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=10, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, path: str, *, json: Any = None, data: bytes | None = None
    ) -> Any:
        """Send one request; return the JSON (or text) answer, or raise ``ApiError``."""
        assert self._session is not None, "use 'async with AgentClient(...)'"
        with self._errors():
            async with self._session.request(
                method, self.base + path, json=json, data=data
            ) as resp:
                try:
                    body = decode_answer(await read_answer(resp), resp.content_type)
                except AnswerTooLarge as exc:
                    raise ApiError(f"{method} {path}: {exc}", resp.status) from exc
                if resp.status >= 400:
                    raise error_from_answer(resp.status, body)
                return body

    async def lines(self, path: str, limit: int = MAX_STREAM_LINE) -> AsyncIterator[bytes]:
        """A streamed answer's lines as they come (``GET /v1/logs?follow=1``), each at most
        ``limit`` bytes (``ApiError`` past it); ``ApiError`` for a refusal."""
        assert self._session is not None, "use 'async with AgentClient(...)'"
        with self._errors():
            async with self._session.get(self.base + path) as resp:
                if resp.status >= 400:
                    body = decode_answer(await read_answer(resp), resp.content_type)
                    raise error_from_answer(resp.status, body)
                pending = bytearray()
                async for chunk in resp.content.iter_any():
                    pending += chunk
                    while (end := pending.find(b"\n")) >= 0:
                        yield bytes(pending[:end])
                        del pending[: end + 1]
                    if len(pending) > limit:
                        raise ApiError(f"GET {path}: a line over {limit} bytes", resp.status)
                if pending:
                    yield bytes(pending)

    @contextlib.asynccontextmanager
    async def websocket(self, path: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """A WebSocket to ``path`` (``/v1/vms/NAME/console/attach``). A refused upgrade says
        only its status, so the same URL is asked again as a plain GET, whose answer is the
        agent's error body (the route refuses before it attaches anything): the ``ApiError``
        names why."""
        assert self._session is not None, "use 'async with AgentClient(...)'"
        with self._errors():
            try:
                ws = await self._session.ws_connect(
                    self.base + path, max_msg_size=MAX_WS_MESSAGE, heartbeat=30.0
                )
            except aiohttp.WSServerHandshakeError as exc:
                await self.request("GET", path)  # raises the agent's own refusal
                raise ApiError(f"GET {path}: WebSocket refused (HTTP {exc.status})",
                               exc.status) from exc  # fmt: skip
        try:
            yield ws
        finally:
            await ws.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Connection and TLS failures as one ``ApiError`` each, with a hint."""
        try:
            yield
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ApiError(
                f"{self.base}: the agent's certificate is not trusted: {exc.certificate_error}",
                0,
                hint="check --ca: it must be the CA that signed the agent's certificate",
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise ApiError(f"{self.base}: TLS handshake failed: {exc}", 0) from exc
        except aiohttp.ClientPayloadError as exc:  # the agent went away mid-answer
            raise ApiError(f"{self.base}: the answer was cut short: {exc}", 0) from exc
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ApiError(
                f"cannot reach the agent at {self.base}: {exc or type(exc).__name__}",
                0,
                hint="is hatchery-agent running there, and is --agent right?",
            ) from exc
