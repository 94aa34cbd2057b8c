"""Clients read an agent's answer only up to a limit: a hostile node cannot fill their memory.

A real aiohttp server on loopback, behind the agent's own mutual-TLS context, streams
answers (chunked without end, a lying Content-Length, an ordinary small one); the CLI's and
the rollout's clients are the real ones.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from hatchery import pki
from hatchery.client import AgentClient as CliClient
from hatchery.client import ApiError, Credentials, decode_answer
from hatchery_rollout.client import MAX_ANSWER_BYTES, AgentClient
from hatchery_rollout.errors import AgentError
from hatchery_rollout.inventory import Host

CHUNK = b"x" * 65536
ENDLESS = 64 << 20  # bounded for the test's sake; far past every limit


async def _endless(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    sent = 0
    while sent < ENDLESS:  # bounded for the test's sake; far past every limit
        await resp.write(CHUNK)
        sent += len(CHUNK)
    await resp.write_eof()
    return resp


async def _declared_huge(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Length": str(1 << 40)})
    await resp.prepare(request)
    await resp.write(CHUNK)
    return resp


async def _small(request: web.Request) -> web.Response:
    return web.json_response({"state": "idle"})


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[str, Credentials]]:
    """A stand-in agent on loopback with the real TLS set-up; its address and a caller."""
    ca = pki.init_ca(tmp_path / "ca")
    served = pki.issue(tmp_path / "ca", "agent", tmp_path / "tls", server_names=("127.0.0.1",))
    caller = pki.issue(tmp_path / "ca", "operator", tmp_path / "tls", groups=("admin",))
    app = web.Application()
    app.router.add_get("/endless", _endless)
    app.router.add_get("/huge", _declared_huge)
    app.router.add_get("/small", _small)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0,
                       ssl_context=pki.server_context(ca, served.cert, served.key))  # fmt: skip
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"127.0.0.1:{port}", Credentials(ca, caller.cert, caller.key)
    finally:
        await runner.cleanup()


async def test_the_cli_reads_at_most_its_limit(agent: tuple[str, Credentials]) -> None:
    address, creds = agent
    async with CliClient(address, creds) as client:
        assert await client.request("GET", "/small") == {"state": "idle"}
        with pytest.raises(ApiError, match="bytes, over"):
            await client.request("GET", "/huge")  # refused on its Content-Length alone
        tracemalloc.start()
        try:
            with pytest.raises(ApiError, match="answer over 16777216 bytes"):
                await client.request("GET", "/endless")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 3 * (16 << 20), peak  # the limit, not the 64 MiB sent


async def test_the_rollout_reads_at_most_its_limit(agent: tuple[str, Credentials]) -> None:
    address, creds = agent
    host = Host(name="h1", address=address)
    context = pki.client_context(creds.ca, creds.cert, creds.key)
    async with AgentClient(context) as client:
        status, data = await client._call(host, "GET", "/small")
        assert (status, data) == (200, {"state": "idle"})
        with pytest.raises(AgentError, match=f"h1 .*answer over {MAX_ANSWER_BYTES} bytes"):
            await client._call(host, "GET", "/endless")


def test_decode_answer_is_tolerant() -> None:
    assert decode_answer(b'{"a": 1}', "application/json") == {"a": 1}
    assert decode_answer(b"{not json", "application/json") == "{not json"
    assert decode_answer(b"\xffplain", "text/plain") == "\ufffdplain"
