"""The container image routes: publish a signed OCI archive into the node's store, list them.

``PUT /v1/containers/{name}/{tag}``: the body is the archive; the header
``X-Hatchery-Signed-Ref`` carries its signed reference (``containers.signed``), base64.
The upload is streamed to a partial file, at most the signed size, then handed to the store,
which checks signature, digest and that the archive holds the tag (``images.manage``).
``GET /v1/containers`` lists them (``images.read``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets

from aiohttp import web

from hatchery.api.http import TooLarge, caller, require
from hatchery.api.validate import BadRequest
from hatchery.containers import signed
from hatchery.containers.store import ContainerStore

log = logging.getLogger(__name__)
SIGNED_HEADER = "X-Hatchery-Signed-Ref"
STORE = web.AppKey("container_store", ContainerStore)


@require("images.manage")
async def publish(request: web.Request) -> web.Response:
    store = request.app[STORE]
    try:
        raw = base64.b64decode(request.headers.get(SIGNED_HEADER, ""), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{SIGNED_HEADER} must be the signed reference, base64") from None
    doc = signed.parse(raw)
    name, tag = request.match_info["name"], request.match_info["tag"]
    if (doc.ref.name, doc.ref.tag) != (name, tag):
        raise BadRequest(f"the signed reference names {doc.ref}, the path {name}:{tag}")
    if request.content_length is not None and request.content_length != doc.ref.size:
        raise TooLarge(f"the body is {request.content_length} bytes, the signed archive "
                       f"{doc.ref.size}")  # fmt: skip
    part = store.partial(secrets.token_hex(8))
    try:
        received = 0
        with part.open("xb") as out:
            async for chunk in request.content.iter_chunked(1 << 20):
                received += len(chunk)
                if received > doc.ref.size:
                    raise TooLarge(f"the body is larger than the signed archive ({doc.ref.size})")
                await asyncio.to_thread(out.write, chunk)
        ref = await asyncio.to_thread(store.publish, part, raw)
    finally:
        part.unlink(missing_ok=True)
    log.info("%s published container image %s", caller(request).name, ref)
    return web.json_response({"name": ref.name, "tag": ref.tag, "sha256": ref.sha256,
                              "size": ref.size, "key": doc.key_id}, status=201)  # fmt: skip


@require("images.read")
async def list_containers(request: web.Request) -> web.Response:
    refs = await asyncio.to_thread(request.app[STORE].refs)
    return web.json_response({"containers": [r.to_json() for r in refs]})


def add_routes(app: web.Application, store: ContainerStore) -> None:
    app[STORE] = store
    app.router.add_get("/v1/containers", list_containers)
    app.router.add_put("/v1/containers/{name}/{tag}", publish)
