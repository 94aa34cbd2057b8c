"""The node's certificate revocation list on the API: read it, replace it with a newer one.

``PUT /v1/pki/crl`` (``pki.manage``: the ``admin`` group in the default policy, nobody
else) takes a CRL, PEM or DER, as the body. It is installed only if the node's own CA signed
it and it is newer than the CRL in force (a higher CRL number, else a later
``lastUpdate``): a body never grants anything, and an old CRL cannot un-revoke a
certificate. ``GET /v1/pki/crl`` (``pki.read``) says which CRL is in force.
"""

from __future__ import annotations

import logging

from aiohttp import web

from hatchery.api.http import REVOCATIONS, Unavailable, caller, read_body, require
from hatchery.revocation import Revocations

log = logging.getLogger(__name__)
#: A CRL of a few thousand entries is some 100 KiB; this leaves room and bounds the read.
MAX_CRL = 1024 * 1024


def _revocations(request: web.Request) -> Revocations:
    revocations = request.app.get(REVOCATIONS)
    if revocations is None:
        raise Unavailable("this agent runs without a revocation list")
    return revocations


@require("pki.read")
async def show_crl(request: web.Request) -> web.Response:
    info = _revocations(request).info()
    return web.json_response({"crl": info.to_json() if info is not None else None})


@require("pki.manage")
async def put_crl(request: web.Request) -> web.Response:
    revocations = _revocations(request)
    info = revocations.install(await read_body(request, MAX_CRL))
    log.info("CRL number %s installed by %s (%d revoked)", info.number, caller(request).name,
             info.revoked)  # fmt: skip
    return web.json_response({"crl": info.to_json()})


def add_routes(app: web.Application, revocations: Revocations) -> None:
    app[REVOCATIONS] = revocations
    app.router.add_get("/v1/pki/crl", show_crl)
    app.router.add_put("/v1/pki/crl", put_crl)
