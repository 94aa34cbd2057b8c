"""The image store on the agent's API: list, serve, upload, publish, fetch.

Reads need ``images.read`` (the default policy's ``*.read`` and the ``node`` group give it),
writes ``images.manage``. ``add_routes(app, ImagesContext.build(...))`` mounts them on an app
made by ``api.http.new_app`` (the agent's API app in ``api.app``).

``GET /v1/objects/<sha256>`` serves the object *as stored*, with Range requests, so a peer
resumes at a byte offset of that file and checks the content itself: a zstd-compressed object
as the zstd file (``Content-Type: application/zstd``, no ``Content-Encoding``), an object kept
as is (already compressed content) as that content (``application/octet-stream``) to a peer
that accepts it, and to an older peer, which asks for zstd only, framed as a zstd file of raw
blocks on the fly (``images.rawframe``: nothing compressed, any range answered).
``PUT /v1/objects/<sha256>`` takes the *uncompressed* content and stores it only if it hashes
to the name. With ``?running_root_at=OFFSET&running_root_size=SIZE`` the body is that content
with the node's own running root image left out at OFFSET (``images.running_root``): the node
puts its image there, so publishing the image a node runs costs it a hash, not an upload.
With ``?patched_on_running_root=SIZE`` the body is a zstd patch against that image (``zstd
--patch-from``), so publishing the next version costs a patch of a few MB.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from hatchery.api.http import TooLarge, Unavailable, caller, json_body, read_body, require
from hatchery.api.validate import BadRequest
from hatchery.errors import HatcheryError
from hatchery.images import rawframe, running_root
from hatchery.images.fetch import RAW_TYPE, ZSTD_TYPE, ImageFetcher
from hatchery.images.manifest import MAX_DOCUMENT, ManifestError, check_version, is_sha256
from hatchery.images.running_root import NotRunningRoot
from hatchery.images.signing import KeySource
from hatchery.images.store import RAW, CorruptObject, ImageStore, ObjectNotFound, ObjectWriter

log = logging.getLogger(__name__)
UPLOAD_BATCH = 1 << 20
# Pieces held before a batch is written, whatever their size: a client sending its body in
# one-byte HTTP chunks must not make a million Python objects of one batch.
UPLOAD_PIECES = 4096
FRAME_CHUNK = 1 << 20
MAX_PEER = 300
MAX_FETCH_BODY = 4096
WHOLE = "upload the object whole"


@dataclass(frozen=True, slots=True)
class ImagesContext:
    """What the image routes work on; ``fetcher`` is None when the agent has no client
    credentials towards peers (then ``POST /v1/images/fetch`` is refused)."""

    store: ImageStore
    keys: KeySource
    fetcher: ImageFetcher | None = None
    # The device of the root image this node booted, if it did (uploads around it).
    running_root: Callable[[], Path | None] = running_root.running_root_device

    @classmethod
    def build(
        cls, store: ImageStore, keys: KeySource, client_tls: ssl.SSLContext | None = None
    ) -> ImagesContext:
        """``client_tls`` (the agent's own certificate as a client) lets it fetch from peers."""
        fetcher = ImageFetcher(store, keys, client_tls) if client_tls is not None else None
        return cls(store, keys, fetcher)


IMAGES = web.AppKey("images", ImagesContext)


def _sha(request: web.Request) -> str:
    sha = request.match_info["sha256"]
    if not is_sha256(sha):
        raise BadRequest("an object is named by its sha256: 64 lowercase hex digits", "sha256")
    return sha


def _version(value: object, field: str) -> str:
    """A version named by the caller, checked with the manifest's own rule."""
    try:
        return check_version(value, field)
    except ManifestError as exc:
        raise BadRequest(exc.message, field) from None


# --- reads ---------------------------------------------------------------------------------------
@require("images.read")
async def list_images(request: web.Request) -> web.Response:
    store = request.app[IMAGES].store
    listed: list[dict[str, Any]] = []
    for version in store.versions():
        try:
            signed = store.manifest(version)
        except HatcheryError as exc:
            listed.append({"version": version, "error": exc.message})
            continue
        m = signed.manifest
        listed.append(
            {
                "version": m.version,
                "image": m.image,
                "key": signed.key_id,
                "size": m.size(),
                "artefacts": {str(r): a.to_json() for r, a in sorted(m.artefacts.items())},
            }
        )
    return web.json_response(
        {"images": listed, "current": store.current(), "previous": store.previous()}
    )


@require("images.read")
async def show_image(request: web.Request) -> web.Response:
    version = _version(request.match_info["version"], "version")
    return web.Response(
        body=request.app[IMAGES].store.manifest_bytes(version), content_type="application/json"
    )


@require("images.read")
async def get_object(request: web.Request) -> web.StreamResponse:
    sha = _sha(request)
    path = request.app[IMAGES].store.object_path(sha)
    if not path.is_file():
        raise ObjectNotFound(f"object {sha} is not in the store")
    if path.suffix != RAW:
        return web.FileResponse(path, headers={"Content-Type": ZSTD_TYPE})
    if RAW_TYPE in request.headers.get("Accept", ""):
        return web.FileResponse(path, headers={"Content-Type": RAW_TYPE})
    return await _framed(request, path)


async def _framed(request: web.Request, path: Path) -> web.StreamResponse:
    """The object kept as is, sent as the zstd file of raw blocks that frames it (for peers
    that ask for zstd only), whole or the one byte range asked."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        total = rawframe.framed_size(size)
        try:
            asked = request.http_range
        except ValueError:
            asked = slice(None, None)  # a malformed Range is ignored, as for files
        start, stop = asked.start, asked.stop
        ranged = start is not None or stop is not None
        if start is not None and start < 0:  # bytes=-N: the last N bytes
            start, stop = max(0, total + start), total
        start = start or 0
        stop = total if stop is None else min(stop, total)
        if ranged and not start < stop:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{total}"})
        response = web.StreamResponse(status=206 if ranged else 200)
        response.content_type = ZSTD_TYPE
        response.content_length = stop - start
        response.headers["Accept-Ranges"] = "bytes"
        if ranged:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        for piece in rawframe.pieces(size, start, stop):
            if isinstance(piece, bytes):
                await response.write(piece)
                continue
            offset, left = piece.offset, piece.count
            while left:
                chunk = await asyncio.to_thread(os.pread, f.fileno(), min(left, FRAME_CHUNK),
                                                offset)  # fmt: skip
                if not chunk:
                    raise ConnectionResetError(f"{path.name} shrank while it was sent")
                await response.write(chunk)
                offset += len(chunk)
                left -= len(chunk)
        await response.write_eof()
        return response


# --- writes --------------------------------------------------------------------------------------
@require("images.manage")
async def put_object(request: web.Request) -> web.Response:
    """Stream the upload into the store in batches; it enters only if it hashes to its name."""
    store = request.app[IMAGES].store
    sha = _sha(request)
    if "running_root_at" in request.query:
        return await _put_around_running_root(request, sha)
    if "patched_on_running_root" in request.query:
        return await _put_patched_on_running_root(request, sha)
    if request.content_length is not None and request.content_length > store.max_object:
        raise TooLarge(f"the object is larger than {store.max_object} bytes")
    existed = store.has_object(sha)
    writer = await asyncio.to_thread(store.writer, sha)

    def write(pieces: list[bytes]) -> None:  # in a worker thread: the join is a copy
        writer.write(b"".join(pieces))

    try:
        # The pieces as the connection delivers them, joined off the event loop: the loop
        # thread also decrypts the TLS records of every connection and answers the API, so
        # each copy of an upload made there is taken from all of them (two copies fewer: a
        # fifth less of the loop's CPU per upload on a host; docs/benchmarks.md).
        batch: list[bytes] = []
        size = 0
        async for piece, _ in request.content.iter_chunks():
            batch.append(piece)
            size += len(piece)
            if size >= UPLOAD_BATCH or len(batch) >= UPLOAD_PIECES:
                await asyncio.to_thread(write, batch)
                batch, size = [], 0
        if batch:
            await asyncio.to_thread(write, batch)
        await asyncio.to_thread(writer.commit)
    finally:
        writer.abort()
    log.info("%s uploaded object %s (%d bytes)", caller(request).name, sha, writer.size)
    return web.json_response({"sha256": sha, "size": writer.size}, status=200 if existed else 201)


def _query_int(request: web.Request, name: str) -> int:
    value = request.query.get(name, "")
    if not value.isdigit() or len(value) > 12:
        raise BadRequest(f"{name} must be a byte count", name)
    return int(value)


async def _running_root(request: web.Request, size: int) -> Path:
    """This node's running root image, if it is ``size`` bytes (else 409: the client then
    uploads the object whole)."""
    device = request.app[IMAGES].running_root()
    if device is None:
        raise NotRunningRoot("this node did not boot from a live root image", hint=WHOLE)
    held = await asyncio.to_thread(running_root.size_of, device)
    if held != size:
        raise NotRunningRoot(f"this node's running root image is {held} bytes, not {size}",
                             hint=WHOLE)  # fmt: skip
    return device


async def _store_with_root(
    request: web.Request, sha: str, size: int, fill: Callable[[ObjectWriter], None]
) -> web.Response:
    """Store what ``fill`` writes (in a worker thread: hashing 100 MB) as object ``sha``, an
    object made with this node's running root image (``size`` bytes of it); 409 if that
    does not hash to ``sha``."""
    store = request.app[IMAGES].store
    existed = store.has_object(sha)

    def assemble() -> int:
        with store.writer(sha) as writer:
            fill(writer)
            writer.commit()
            return writer.size

    try:
        total = await asyncio.to_thread(assemble)
    except CorruptObject as exc:  # the running root is not that object's
        raise NotRunningRoot(f"with this node's running root image, {exc.message}",
                             hint=WHOLE) from None  # fmt: skip
    log.info("%s uploaded object %s (%d bytes, made with this node's running root image)",
             caller(request).name, sha, total)  # fmt: skip
    return web.json_response({"sha256": sha, "size": total, "from_running_root": size},
                             status=200 if existed else 201)  # fmt: skip


async def _put_around_running_root(request: web.Request, sha: str) -> web.Response:
    """The object is the body with this node's running root image inserted at
    ``running_root_at``; stored only if that hashes to ``sha``. 409 when this node has no
    such image or its size is not ``running_root_size`` (the client then uploads it whole)."""
    store = request.app[IMAGES].store
    offset = _query_int(request, "running_root_at")
    size = _query_int(request, "running_root_size")
    device = await _running_root(request, size)
    rest = await read_body(request, running_root.MAX_SENT)
    if offset > len(rest):
        raise BadRequest(f"running_root_at is past the {len(rest)} bytes sent", "running_root_at")
    if len(rest) + size > store.max_object:
        raise TooLarge(f"the object is larger than {store.max_object} bytes")
    return await _store_with_root(
        request, sha, size, lambda w: running_root.write_with_root(w, rest, offset, device, size)
    )


async def _put_patched_on_running_root(request: web.Request, sha: str) -> web.Response:
    """The body is a zstd patch (``zstd --patch-from``) against this node's running root
    image, of ``patched_on_running_root`` bytes; the object is what it decodes to, stored
    only if that hashes to ``sha`` (and is no larger than the store takes). 409 when this
    node has no such image, or the patch does not decode against it."""
    size = _query_int(request, "patched_on_running_root")
    device = await _running_root(request, size)
    patch = await read_body(request, running_root.MAX_SENT)
    return await _store_with_root(
        request, sha, size, lambda w: running_root.write_patched(w, patch, device, size)
    )


@require("images.manage")
async def publish(request: web.Request) -> web.Response:
    """The body is the signed manifest itself (bytes as signed), not a JSON wrapper."""
    store, keys = request.app[IMAGES].store, request.app[IMAGES].keys
    raw = await read_body(request, MAX_DOCUMENT)
    existed = set(store.versions())
    signed = await asyncio.to_thread(store.add_image, raw, keys.trusted())
    version = signed.manifest.version
    log.info("%s published image %s", caller(request).name, version)
    return web.json_response(
        {"version": version, "image": signed.manifest.image, "key": signed.key_id},
        status=200 if version in existed else 201,
    )


@require("images.manage")
async def fetch(request: web.Request) -> web.Response:
    """``{"peer": "HOST[:PORT]", "version": "..."}``: the peer is an agent address only (no
    path, query or credentials), so a caller cannot point the agent at another URL."""
    fetcher = request.app[IMAGES].fetcher
    if fetcher is None:
        raise Unavailable("this agent has no client credentials to fetch from peers")
    body = await json_body(request, MAX_FETCH_BODY)
    peer = str(body.text("peer", required=True, max_len=MAX_PEER))
    version = _version(body.text("version", required=True, max_len=MAX_PEER), "version")
    body.finish()
    if not peer or any(c.isspace() or c in "/?#@" for c in peer.removeprefix("https://")):
        raise BadRequest("peer must be an agent address HOST[:PORT]", "peer")
    log.info("%s asks for image %s from %s", caller(request).name, version, peer)
    report = await fetcher.fetch(peer, version)
    return web.json_response(report.to_json(), status=201 if report.added else 200)


def add_routes(app: web.Application, context: ImagesContext) -> None:
    """Mount the image routes on ``app`` (made by ``api.http.new_app``)."""
    app[IMAGES] = context
    app.router.add_get("/v1/images", list_images)
    app.router.add_post("/v1/images", publish)
    app.router.add_post("/v1/images/fetch", fetch)
    app.router.add_get("/v1/images/{version}", show_image)
    app.router.add_get("/v1/objects/{sha256}", get_object)
    app.router.add_put("/v1/objects/{sha256}", put_object)
