"""The image store on the agent's API (mutual TLS): list, serve, upload, publish, fetch.

Mounted with ``add_routes(app, store, keys, policy, client_tls)`` on the agent's API app,
whose identity middleware has put the caller's ``Identity`` on every request. Reads need
``images.read`` (the default policy's ``*.read`` gives it), writes ``images.manage``.

``GET /v1/objects/<sha256>`` serves the object *as stored*: the zstd-compressed file
(``Content-Type: application/zstd``, no ``Content-Encoding``), with Range requests, so a peer
downloads fewer bytes, resumes at a byte offset of that file and checks the content itself.
``PUT /v1/objects/<sha256>`` takes the *uncompressed* content and stores it only if it hashes
to the name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from hatchery.api.app import IDENTITY
from hatchery.api.policy import Policy
from hatchery.errors import HatcheryError
from hatchery.images.fetch import FetchError, ImageFetcher
from hatchery.images.manifest import MAX_DOCUMENT, ManifestError, check_version, is_sha256
from hatchery.images.signing import KeySource, VerificationError
from hatchery.images.store import (
    CorruptObject,
    ImageConflict,
    ImageNotFound,
    ImageStore,
    MissingObjects,
    ObjectNotFound,
)
from hatchery.pki import Identity

log = logging.getLogger(__name__)
UPLOAD_BATCH = 1 << 20
MAX_PEER = 300
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Forbidden(HatcheryError):
    """The caller's groups do not give the permission."""


class BadInput(HatcheryError):
    """The request is malformed."""


_STATUS: tuple[tuple[type[HatcheryError], int], ...] = (
    (Forbidden, 403),
    (BadInput, 400),
    (ManifestError, 400),
    (ObjectNotFound, 404),
    (ImageNotFound, 404),
    (VerificationError, 422),
    (CorruptObject, 422),
    (MissingObjects, 409),
    (ImageConflict, 409),
    (FetchError, 502),
)


class ImagesApi:
    def __init__(
        self, store: ImageStore, keys: KeySource, policy: Policy, fetcher: ImageFetcher | None
    ) -> None:
        self.store = store
        self.keys = keys
        self.policy = policy
        self.fetcher = fetcher

    def _require(self, request: web.Request, permission: str) -> Identity:
        who: Identity = request[IDENTITY]
        if not self.policy.allows(who, permission):
            groups = ", ".join(sorted(who.groups)) or "none"
            raise Forbidden(f"{who.name} (groups: {groups}) may not {permission}")
        return who

    @staticmethod
    def _guard(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except HatcheryError as exc:
                status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
                if status == 500:
                    log.error("%s %s: %s", request.method, request.path, exc.message)
                body: dict[str, Any] = {"error": exc.message}
                if exc.hint:
                    body["hint"] = exc.hint
                if isinstance(exc, MissingObjects):
                    body["missing"] = exc.missing
                return web.json_response(body, status=status)

        return guarded

    @staticmethod
    def _sha(request: web.Request) -> str:
        sha = request.match_info["sha256"]
        if not is_sha256(sha):
            raise BadInput("an object is named by its sha256: 64 lowercase hex digits")
        return sha

    # --- reads -------------------------------------------------------------------------------
    async def list_images(self, request: web.Request) -> web.Response:
        self._require(request, "images.read")
        images: list[dict[str, Any]] = []
        for version in self.store.versions():
            try:
                signed = self.store.manifest(version)
            except HatcheryError as exc:
                images.append({"version": version, "error": exc.message})
                continue
            m = signed.manifest
            images.append(
                {
                    "version": m.version,
                    "image": m.image,
                    "key": signed.key_id,
                    "size": m.size(),
                    "artefacts": {str(r): a.to_json() for r, a in sorted(m.artefacts.items())},
                }
            )
        return web.json_response(
            {
                "images": images,
                "current": self.store.current(),
                "previous": self.store.previous(),
            }
        )

    async def show_image(self, request: web.Request) -> web.Response:
        self._require(request, "images.read")
        version = request.match_info["version"]
        try:
            check_version(version)
        except ManifestError as exc:
            raise BadInput(exc.message) from None
        return web.Response(
            body=self.store.manifest_bytes(version), content_type="application/json"
        )

    async def get_object(self, request: web.Request) -> web.StreamResponse:
        self._require(request, "images.read")
        path = self.store.object_path(self._sha(request))
        if not path.is_file():
            raise ObjectNotFound(f"object {path.name[:-4]} is not in the store")
        return web.FileResponse(path, headers={"Content-Type": "application/zstd"})

    # --- writes ------------------------------------------------------------------------------
    async def put_object(self, request: web.Request) -> web.Response:
        who = self._require(request, "images.manage")
        sha = self._sha(request)
        if request.content_length is not None and request.content_length > self.store.max_object:
            raise BadInput(f"the object is larger than {self.store.max_object} bytes")
        existed = self.store.has_object(sha)
        writer = await asyncio.to_thread(self.store.writer, sha)
        try:
            batch = bytearray()
            async for chunk in request.content.iter_chunked(256 * 1024):
                batch += chunk
                if len(batch) >= UPLOAD_BATCH:
                    await asyncio.to_thread(writer.write, bytes(batch))
                    batch.clear()
            if batch:
                await asyncio.to_thread(writer.write, bytes(batch))
            await asyncio.to_thread(writer.commit)
        finally:
            writer.abort()
        log.info("%s uploaded object %s (%d bytes)", who.name, sha, writer.size)
        return web.json_response(
            {"sha256": sha, "size": writer.size}, status=200 if existed else 201
        )

    async def publish(self, request: web.Request) -> web.Response:
        who = self._require(request, "images.manage")
        raw = await _read_limited(request, MAX_DOCUMENT)
        existed = set(self.store.versions())
        signed = await asyncio.to_thread(self.store.add_image, raw, self.keys.trusted())
        version = signed.manifest.version
        log.info("%s published image %s", who.name, version)
        return web.json_response(
            {"version": version, "image": signed.manifest.image, "key": signed.key_id},
            status=200 if version in existed else 201,
        )

    async def fetch(self, request: web.Request) -> web.Response:
        who = self._require(request, "images.manage")
        if self.fetcher is None:
            raise BadInput("this agent has no client credentials to fetch from peers")
        raw = await _read_limited(request, 4096)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadInput(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict) or set(body) - {"peer", "version"}:
            raise BadInput('the body must be {"peer": "host:port", "version": "..."}')
        peer, version = body.get("peer"), body.get("version")
        if (
            not isinstance(peer, str)
            or not 0 < len(peer) <= MAX_PEER
            or any(c.isspace() or c in "/?#@" for c in peer.removeprefix("https://"))
        ):
            raise BadInput("peer must be an agent address HOST[:PORT]")
        try:
            check_version(version)
        except ManifestError as exc:
            raise BadInput(exc.message) from None
        assert isinstance(version, str)
        log.info("%s asks for image %s from %s", who.name, version, peer)
        report = await self.fetcher.fetch(peer, version)
        return web.json_response(report.to_json(), status=201 if report.added else 200)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BadInput(f"the body is larger than {limit} bytes")
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise BadInput(f"the body is larger than {limit} bytes")
    return bytes(data)


def add_routes(
    app: web.Application,
    store: ImageStore,
    keys: KeySource,
    policy: Policy,
    client_tls: ssl.SSLContext | None = None,
) -> ImagesApi:
    """Mount the image routes on ``app``; ``client_tls`` (the agent's own certificate as a
    client) lets it fetch from peers, without it ``POST /v1/images/fetch`` is refused."""
    fetcher = ImageFetcher(store, keys, client_tls) if client_tls is not None else None
    api = ImagesApi(store, keys, policy, fetcher)
    guard = ImagesApi._guard
    app.router.add_get("/v1/images", guard(api.list_images))
    app.router.add_post("/v1/images", guard(api.publish))
    app.router.add_post("/v1/images/fetch", guard(api.fetch))
    app.router.add_get("/v1/images/{version}", guard(api.show_image))
    app.router.add_get("/v1/objects/{sha256}", guard(api.get_object))
    app.router.add_put("/v1/objects/{sha256}", guard(api.put_object))
    return api
