"""The agent's API app driven in-process (aiohttp's test client), without TLS.

TLS is not what these tests are about (tests/integration/agent and tests/integration/images
drive the same app over real mutual TLS): here the identity comes from a test resolver
installed through the app's ``IDENTIFY`` key, reading a header only these tests send. The
agent's own resolver (``tls_identity``) never looks at headers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hatchery.addresses import AddressPool, Subnet
from hatchery.api.app import ApiContext, make_app
from hatchery.api.images import ImagesContext
from hatchery.api.policy import load_policy
from hatchery.capacity import HostCapacity
from hatchery.config import VmSourcesConfig
from hatchery.health import NodeHealth
from hatchery.images.signing import KeyDirectory
from hatchery.images.store import ImageStore
from hatchery.listener import ListenerStats, goodbyes
from hatchery.pki import Identity
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import VmManager
from hatchery.vms.sources import SourceFetcher

WHO = "X-Test-Who"


def header_identity(request: web.Request) -> Identity | None:
    """``X-Test-Who: name:group1,group2`` → that identity; no header → nobody (401)."""
    raw = request.headers.get(WHO)
    if raw is None:
        return None
    name, _, groups = raw.partition(":")
    return Identity(name, frozenset(g for g in groups.split(",") if g))


def who(name: str, *groups: str) -> dict[str, str]:
    return {WHO: f"{name}:{','.join(groups)}"}


ADMIN = who("alice", "admin")
READER = who("rita", "reader")
NOBODY = who("nina")


@dataclass
class Api:
    client: TestClient  # type: ignore[type-arg]
    manager: VmManager
    store: ImageStore
    kernel: Path
    keys: Path


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, running_root: Callable[[], Path | None] | None = None
) -> AsyncIterator[Api]:
    """The API app on a test server; ``running_root``: the node's running root image (none
    by default, as on a host that did not boot a live root)."""
    pool = AddressPool(tmp_path / "pool.db")
    pool.add_subnet(Subnet("br0", ipaddress.IPv4Network("10.5.0.0/24"), None, ()))
    pool.add_range(ipaddress.IPv4Address("10.5.0.10"), ipaddress.IPv4Address("10.5.0.19"))
    store = ImageStore(tmp_path / "images")
    artefacts = tmp_path / "artefacts"
    artefacts.mkdir()
    sources = SourceFetcher(VmSourcesConfig(folders=(artefacts,)), store)
    manager = VmManager(tmp_path, pool, HostCapacity(8, 4096, 10_000), AccelChoice(Accel.TCG, "t"),
                        sources=sources)  # fmt: skip
    keys = tmp_path / "image-keys"
    keys.mkdir()
    # A fetcher that is never reached: the requests below are refused before any fetch.
    images = ImagesContext.build(store, KeyDirectory(keys), ssl.create_default_context())
    images = dataclasses.replace(images, running_root=running_root or (lambda: None))
    context = ApiContext(manager, pool, load_policy(None), NodeHealth("v1"), time.time())
    app = make_app(context, images, identify=header_identity)
    app.middlewares.append(goodbyes(ListenerStats(), "api"))  # as ``HttpListener`` serves it
    kernel = artefacts / "kernel"  # in the artefact folder: a source a request may name
    kernel.write_bytes(b"not really a kernel")
    try:
        async with TestClient(TestServer(app)) as client:
            # As the agent serves (aiohttp's default, which its test server turns off): a
            # handler is not cancelled when its client leaves.
            client.server.runner.server.handler_cancellation = False  # type: ignore[union-attr]
            yield Api(client, manager, store, kernel, keys)
    finally:
        pool.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with serving(tmp_path) as served:
        yield served
