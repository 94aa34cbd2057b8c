"""Helpers for tests of the boot HTTP service over loopback: a GET or a seed request from a
chosen source address, and the seed URL a boot script names."""

from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp
from aiohttp.test_utils import TestServer

TOKEN_URL = re.compile(r"hatchery\.seed=(http://[^ ]+/seed/([A-Za-z0-9_-]{43}))(?: |$)", re.M)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]


async def get(server: TestServer, path: str, source: str = "127.0.0.1") -> Answer:
    """GET ``path`` from ``source`` (127.0.0.1 or another loopback address)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(server.make_url(path)) as resp:
            return Answer(resp.status, await resp.read(), dict(resp.headers))


async def post(server: TestServer, path: str, body: bytes, source: str = "127.0.0.1") -> Answer:
    """POST ``body`` to ``path`` from ``source``: how a newborn asks for its sealed seed."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(server.make_url(path), data=body) as resp:
            return Answer(resp.status, await resp.read(), dict(resp.headers))
