"""The metadata server under a flood of requests from addresses it does not know."""

from __future__ import annotations

import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hatchery.metadata.server import VmMetadata, make_app


class _NoVms:
    def vm_by_ip(self, bridge: str, ip: str) -> VmMetadata | None:
        return None


async def test_refusals_of_unknown_sources_are_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anything on the bridge can reach 169.254.169.254: a line per refused request would
    let it flood the agent's log (issue 14)."""
    caplog.set_level(logging.DEBUG, logger="hatchery")
    async with TestClient(TestServer(make_app("br0", _NoVms()))) as client:
        for _ in range(200):
            answer = await client.get("/latest/meta-data/")
            assert answer.status == 403
    lines = [r for r in caplog.records if r.name.startswith("hatchery")]
    assert len(lines) == 1, [r.getMessage() for r in lines]
