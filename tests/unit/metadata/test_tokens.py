"""IMDSv2 tokens: one bounded table per VM, a token good only for the VM that got it (issue 14).

The real metadata app on a real loopback server; each VM is a different loopback source
address (127.0.0.2, 127.0.0.3), as each VM on a bridge is a different address.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from hatchery.metadata.server import (
    TOKEN_HEADER,
    TOKENS,
    TOKENS_PER_VM,
    TTL_HEADER,
    VmMetadata,
    _Tokens,
    make_app,
)

VMS = {
    "127.0.0.2": VmMetadata("a", "uuid-a", "127.0.0.2", "52:54:00:00:00:0a"),
    "127.0.0.3": VmMetadata("b", "uuid-b", "127.0.0.3", "52:54:00:00:00:0b"),
}
A, B = "127.0.0.2", "127.0.0.3"


class _Vms:
    def vm_by_ip(self, bridge: str, ip: str) -> VmMetadata | None:
        return VMS.get(ip)


async def _serve(require_token: bool) -> AsyncIterator[TestServer]:
    server = TestServer(make_app("br0", _Vms(), require_token=require_token), host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async for s in _serve(require_token=False):
        yield s


@pytest.fixture
async def strict() -> AsyncIterator[TestServer]:
    async for s in _serve(require_token=True):
        yield s


async def _call(
    server: TestServer, source: str, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """One request from ``source`` (a loopback address standing for one VM)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://127.0.0.1:{server.port}{path}", headers=headers) as r,
    ):
        return r.status, await r.text()


async def _token(server: TestServer, source: str, ttl: str = "60") -> str:
    status, text = await _call(server, source, "PUT", "/latest/api/token", {TTL_HEADER: ttl})
    assert status == 200, text
    return text


async def test_a_flood_of_tokens_from_one_vm_evicts_no_other_vms_token(server: TestServer) -> None:
    """On main one table of 4096 tokens served every VM: A asking 4096 times evicted B's."""
    b_token = await _token(server, B)
    for _ in range(TOKENS_PER_VM * 3):
        await _token(server, A)
    # Many more than any table holds, straight into the app's table (the network adds time,
    # not coverage): still only A's own tokens go.
    tokens, now = server.app[TOKENS], time.time()
    for _ in range(5000):
        tokens.issue(f"uuid-a@{A}", 60, now)
    status, text = await _call(server, B, "GET", "/latest/meta-data/instance-id",
                               {TOKEN_HEADER: b_token})  # fmt: skip
    assert (status, text) == (200, "uuid-b")
    assert tokens.count(f"uuid-a@{A}") == TOKENS_PER_VM, "A's table is bounded"


async def test_a_token_is_good_only_for_the_vm_that_got_it(server: TestServer) -> None:
    a_token = await _token(server, A)
    status, _ = await _call(server, B, "GET", "/latest/meta-data/instance-id",
                            {TOKEN_HEADER: a_token})  # fmt: skip
    assert status == 401
    status, text = await _call(server, A, "GET", "/latest/meta-data/instance-id",
                               {TOKEN_HEADER: a_token})  # fmt: skip
    assert (status, text) == (200, "uuid-a")


async def test_the_oldest_token_of_a_vm_goes_first(server: TestServer) -> None:
    first = await _token(server, A)
    later = [await _token(server, A) for _ in range(TOKENS_PER_VM)]
    path = "/latest/meta-data/local-ipv4"
    assert (await _call(server, A, "GET", path, {TOKEN_HEADER: first}))[0] == 401
    assert (await _call(server, A, "GET", path, {TOKEN_HEADER: later[0]})) == (200, A)
    assert (await _call(server, A, "GET", path, {TOKEN_HEADER: later[-1]})) == (200, A)


@pytest.mark.parametrize("ttl", ["0", "21601", "-5", "x", ""])
async def test_ttl_outside_1_to_21600_is_refused(server: TestServer, ttl: str) -> None:
    status, _ = await _call(server, A, "PUT", "/latest/api/token", {TTL_HEADER: ttl})
    assert status == 400


async def test_ttl_limits_are_accepted_and_expiry_holds() -> None:
    tokens = _Tokens()
    token = tokens.issue("vm", 21600, 0.0)
    assert tokens.valid(token, "vm", 21599.0)
    assert not tokens.valid(token, "vm", 21600.0)
    assert not tokens.valid(token, "other", 1.0)


async def test_a_token_is_not_issued_through_a_proxy(server: TestServer) -> None:
    status, _ = await _call(server, A, "PUT", "/latest/api/token",
                            {TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.9"})  # fmt: skip
    assert status == 403


async def test_the_table_of_vms_is_bounded() -> None:
    tokens = _Tokens(per_vm=2, max_vms=3)
    kept = tokens.issue("vm0", 60, 0.0)
    for i in range(1, 10):
        tokens.issue(f"vm{i}", 60, float(i))
    assert sum(tokens.count(f"vm{i}") for i in range(10)) == 3
    assert not tokens.valid(kept, "vm0", 5.0), "the VM that asked least recently went first"
    assert tokens.count("vm9") == 1


async def test_without_require_token_plain_gets_still_work(server: TestServer) -> None:
    """The default: cloud-init's NoCloud and the SmallStack clients send no token."""
    assert await _call(server, A, "GET", "/nocloud/meta-data") == (
        200, "instance-id: uuid-a\nlocal-hostname: a\n")  # fmt: skip
    assert (await _call(server, A, "GET", "/datasource/SmallStack")) == (200, "true")


async def test_require_token_refuses_gets_without_one(strict: TestServer) -> None:
    status, _ = await _call(strict, A, "GET", "/latest/meta-data/instance-id")
    assert status == 401
    status, _ = await _call(strict, A, "GET", "/nocloud/meta-data")
    assert status == 401
    token = await _token(strict, A)
    got = await _call(strict, A, "GET", "/latest/meta-data/instance-id", {TOKEN_HEADER: token})
    assert got == (200, "uuid-a")
    status, _ = await _call(strict, B, "GET", "/latest/meta-data/instance-id",
                            {TOKEN_HEADER: token})  # fmt: skip
    assert status == 401
