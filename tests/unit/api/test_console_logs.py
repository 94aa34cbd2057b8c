"""The console WebSocket and ``GET /v1/logs`` at the API, driven in-process.

Console: a reader needs ``vm.read``, a writer ``vm.console`` too; another group's VM is a
404 like a missing one; one writer at a time (409, a plain answer that says who); a frame
over the input cap or an idle session is ended. Logs: ``node.logs.read`` (admin, ops; not
``reader``'s ``*.read``), every query value checked (400 naming the field).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from hatchery.api import console
from hatchery.api.http import new_app
from hatchery.api.policy import default_policy
from hatchery.vms.console import ConsoleLimits, Consoles
from hatchery.vms.manager import NotFound
from hatchery.vms.model import VmRecord, VmState
from tests.support.fake_console import FakeQemu, fake_qemu
from tests.unit.api.conftest import ADMIN, READER, Api, header_identity, who

WEB = who("walt", "web")
WEB2 = who("wanda", "web")
DB = who("dora", "db")
OPS = who("otto", "ops")


@dataclass
class FakeVms:
    """The two things the console route asks of the VM manager."""

    vms: dict[str, VmRecord]
    socket: Path

    def get(self, name: str) -> VmRecord:
        if name not in self.vms:
            raise NotFound(f"no vm named {name!r}")
        return self.vms[name]

    def console_socket(self, name: str) -> tuple[Path, tuple[int, ...]]:
        self.get(name)
        return self.socket, (os.getuid(),)


@dataclass
class Rig:
    client: TestClient  # type: ignore[type-arg]
    qemu: FakeQemu
    vms: FakeVms
    consoles: Consoles


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    web1 = VmRecord("web1", "uuid-web1", VmState.RUNNING, 1, 64, 0, "br0", "10.0.0.2",
                    "52:54:00:00:00:02", owner_group="web")  # fmt: skip
    off1 = replace(web1, name="off1", uuid="uuid-off1", state=VmState.STOPPED)
    vms = FakeVms({"web1": web1, "off1": off1}, tmp_path / "console")
    consoles = Consoles(ConsoleLimits(max_input=64, idle_timeout=1.0))
    app = new_app(default_policy(), header_identity)
    console.add_routes(app, vms, consoles)
    async with fake_qemu(vms.socket) as qemu, TestClient(TestServer(app)) as client:
        yield Rig(client, qemu, vms, consoles)


URL = "/v1/vms/{}/console/attach"


async def _binary(ws: aiohttp.ClientWebSocketResponse, want: bytes) -> bytes:
    got = b""
    async with asyncio.timeout(5):
        while want not in got:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            got += msg.data
    return got


async def test_a_writer_types_and_readers_watch(rig: Rig) -> None:
    watch = URL.format("web1") + "?mode=read"
    async with (
        rig.client.ws_connect(URL.format("web1"), headers=WEB) as writer,
        rig.client.ws_connect(watch, headers=READER) as reader,
    ):
        assert (await writer.receive_json())["role"] == "writer"
        assert (await reader.receive_json())["role"] == "reader"
        await rig.qemu.send(b"/ # ")
        await _binary(writer, b"/ # ")
        await _binary(reader, b"/ # ")
        await writer.send_bytes(b"echo hi\r")
        await reader.send_bytes(b"reboot\r")  # a reader's keys go nowhere
        await writer.send_str("ls\r")
        async with asyncio.timeout(5):
            while b"ls\r" not in rig.qemu.received:
                await asyncio.sleep(0.01)
        assert bytes(rig.qemu.received) == b"echo hi\rls\r"


async def test_a_second_writer_is_refused_with_a_reason(rig: Rig) -> None:
    async with rig.client.ws_connect(URL.format("web1"), headers=WEB) as first:
        await first.receive_json()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await rig.client.ws_connect(URL.format("web1"), headers=WEB2)
        assert refused.value.status == 409
        plain = await rig.client.get(URL.format("web1"), headers=WEB2)  # what the CLI reads
        body = await plain.json()
        assert plain.status == 409 and "has a writer already (walt)" in body["error"]
        assert "--read-only" in body["hint"]
        async with rig.client.ws_connect(URL.format("web1") + "?mode=read", headers=WEB2) as r:
            assert (await r.receive_json())["role"] == "reader"
    async with rig.client.ws_connect(URL.format("web1"), headers=WEB2) as second:
        assert (await second.receive_json())["role"] == "writer"  # the first one left


@pytest.mark.parametrize(
    ("name", "mode", "headers", "status"),
    [
        ("web1", "write", READER, 403),  # vm.read but not vm.console
        ("web1", "read", DB, 404),  # another group's VM: as a missing one
        ("nope", "read", DB, 404),
        ("web1", "write", DB, 404),
        ("off1", "write", WEB, 409),  # not running: its log is what there is
        ("web1", "talk", WEB, 400),
        ("web1", "read", {}, 401),
    ],
)
async def test_refusals_come_before_the_upgrade(
    rig: Rig, name: str, mode: str, headers: dict[str, str], status: int
) -> None:
    resp = await rig.client.get(URL.format(name) + f"?mode={mode}", headers=headers)
    assert resp.status == status, await resp.text()
    assert not rig.qemu.connected.is_set()


async def test_another_groups_console_looks_missing(rig: Rig) -> None:
    theirs = await (await rig.client.get(URL.format("web1"), headers=DB)).json()
    missing = await (await rig.client.get(URL.format("nope"), headers=DB)).json()
    assert theirs == {**missing, "error": missing["error"].replace("nope", "web1")}


async def test_an_oversized_frame_ends_the_session(rig: Rig) -> None:
    async with rig.client.ws_connect(URL.format("web1"), headers=ADMIN) as ws:
        await ws.receive_json()
        await ws.send_bytes(b"z" * 65)  # max_input is 64 here
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (
            msg.type is aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        )
    await asyncio.sleep(0.1)
    assert rig.consoles.hub("uuid-web1") is None and b"z" not in rig.qemu.received


async def test_an_idle_session_is_ended(rig: Rig) -> None:
    async with rig.client.ws_connect(URL.format("web1"), headers=ADMIN) as ws:
        await ws.receive_json()
        started = time.monotonic()
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == console.ENDED
        assert "idle" in msg.extra and time.monotonic() - started < 5


# --- GET /v1/logs ---------------------------------------------------------------------------
async def test_logs_need_node_logs_read(api: Api) -> None:
    logging.getLogger("hatchery.test.api").warning("a line for the log route")
    for headers, status in ((ADMIN, 200), (OPS, 200), (READER, 403), (WEB, 403)):
        resp = await api.client.get("/v1/logs?lines=50", headers=headers)
        assert resp.status == status, (headers, await resp.text())
    resp = await api.client.get("/v1/logs?lines=10000", headers=ADMIN)
    assert resp.headers["X-Hatchery-Log-Source"] == "agent"  # no journal on a test machine
    assert resp.content_type == "application/x-ndjson"
    entries = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert any(e["message"] == "a line for the log route" for e in entries)
    assert all(set(e) == {"time", "unit", "level", "source", "message"} for e in entries)


@pytest.mark.parametrize(
    ("query", "field"),
    [("unit=x;rm", "unit"), ("unit=-f", "unit"), ("since=yesterday", "since"), ("lines=0", "lines"),
     ("lines=10001", "lines"), ("lines=x", "lines"), ("follow=yes", "follow")],
)  # fmt: skip
async def test_log_queries_are_checked(api: Api, query: str, field: str) -> None:
    resp = await api.client.get(f"/v1/logs?{query}", headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["field"] == field


async def test_another_unit_needs_a_journal(api: Api) -> None:
    resp = await api.client.get("/v1/logs?unit=ssh.service", headers=ADMIN)
    assert resp.status == 503 and "no journal" in (await resp.json())["error"]
    ok = await api.client.get("/v1/logs?unit=hatchery-agent.service", headers=ADMIN)
    assert ok.status == 200


async def test_log_streams_are_capped_and_freed_when_clients_leave(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    follows = [await api.client.get("/v1/logs?follow=1&lines=1", headers=ADMIN) for _ in range(8)]
    assert all(r.status == 200 for r in follows)
    refused = await api.client.get("/v1/logs", headers=ADMIN)
    assert refused.status == 503 and "as many as" in (await refused.json())["error"]
    for resp in follows:
        resp.close()  # the client leaves; nothing more is logged meanwhile
    async with asyncio.timeout(10):
        while (await api.client.get("/v1/logs?lines=1", headers=ADMIN)).status != 200:
            await asyncio.sleep(0.2)
    # Each follow's source was closed where it was read: a read still running in another
    # task made the close fail ("already running") and left a journalctl behind.
    crashes = [r.getMessage() for r in caplog.records if r.exc_info]
    assert crashes == [], crashes
