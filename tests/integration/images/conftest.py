"""Two image stores behind real aiohttp API apps over mutual TLS on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.typedefs import Middleware

from hatchery import pki
from hatchery.api.http import new_app
from hatchery.api.images import ImagesContext, add_routes
from hatchery.api.policy import load_policy
from hatchery.api.server import ApiServer
from hatchery.client import AgentClient, Credentials
from hatchery.images.signing import KeyDirectory, KeyPair, generate_key
from hatchery.images.store import ImageStore
from hatchery.pki import IssuedPair, client_context, server_context
from hatchery_lab.agent import Pki, free_port


@dataclass
class Node:
    """One agent's image part: its store, its trusted keys, its API on 127.0.0.1:port."""

    name: str
    store: ImageStore
    keys_dir: Path
    port: int
    pki: Pki
    client_pair: IssuedPair
    server: ApiServer | None = None
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def trust(self, key: KeyPair) -> None:
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        (self.keys_dir / f"{key.key_id}.pub").write_bytes(key.public.read_bytes())

    def client(self, who: str = "admin", *groups: str) -> AgentClient:
        pair = self.pki.client(who, *(groups or ("admin",)))
        return AgentClient(self.address, Credentials(self.pki.ca, pair.cert, pair.key))


@dataclass
class Cluster:
    tmp: Path
    pki: Pki
    key: KeyPair
    nodes: list[Node] = field(default_factory=list)

    async def node(self, name: str, *middlewares: Middleware) -> Node:
        # The agent's certificate doubles as its client certificate towards peers (issued as
        # both): its group must be allowed images.read there (the default policy's node is).
        pair = pki.issue(self.pki.root / "ca", name, self.tmp / name / "tls", groups=("node",),
                         server_names=("127.0.0.1",), client=True)  # fmt: skip
        node = Node(name, ImageStore(self.tmp / name / "images"), self.tmp / name / "image-keys",
                    free_port(), self.pki, pair)  # fmt: skip

        @web.middleware
        async def record(
            request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:  # noqa: E501
            node.seen.append((request.method, request.path, request.headers.get("Range")))
            return await handler(request)

        # The agent's own app layer and listener, with only the image routes on it.
        app = new_app(load_policy(None), middlewares=(record, *middlewares))
        peer_tls = client_context(self.pki.ca, pair.cert, pair.key)
        add_routes(app, ImagesContext.build(node.store, KeyDirectory(node.keys_dir), peer_tls))
        node.server = ApiServer(app, server_context(self.pki.ca, pair.cert, pair.key))
        await node.server.start("127.0.0.1", node.port)
        self.nodes.append(node)
        return node


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    made = Cluster(tmp_path, Pki.make(tmp_path / "pki"), generate_key(tmp_path / "signing"))
    try:
        yield made
    finally:
        for node in made.nodes:
            if node.server is not None:
                await node.server.close()
