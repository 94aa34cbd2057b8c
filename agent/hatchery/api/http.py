"""The one HTTP layer of the agent's API: who is calling, may they, and what an error looks like.

Every route of the API (VMs, pool, health, upgrades, images) goes through the same four
pieces, so a client meets one behaviour everywhere:

- **Identity.** ``require`` asks the app's identity resolver (``IDENTIFY``) who sent the
  request. The agent's resolver is ``tls_identity``: the verified client certificate's CN and
  OUs. Tests that are not about TLS install another resolver and drive the app in-process;
  the resolver is an ``AppKey`` of the app, never something a request can choose.
- **Permission.** ``@require(permission)`` wraps every handler, so the check runs before the
  handler reads anything; ``ANY_CLIENT`` marks the few routes any verified client may call.
  A route whose object has an owner group (a VM) passes ``owner=`` to look that group up:
  a grant scoped to that group (``vm.manage:own``) is then enough, and an object the caller
  may not see answers like a missing one.
- **Bodies.** ``read_body`` reads under a size limit (413 above it); ``json_body`` hands the
  bytes to ``validate.Body``, whose errors name the field.
- **Errors.** Every error, ours or aiohttp's, is ``{"error", "field", "hint"}`` (``field`` and
  ``hint`` null when they do not apply) with the status from ``STATUS``: one table mapping
  error types to HTTP statuses, the most specific type winning.
- **Stopping.** An answer held open (a long poll, a followed log) ends as soon as the agent
  begins to stop (``STOPPING``, set by the app's shutdown): aiohttp's graceful stop waits for
  every answer in flight, so one ``hatchery logs --follow`` would otherwise hold a restart,
  and with it a live patch or a reboot upgrade, for two minutes. The client asks again, of
  the next agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from enum import Enum
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from hatchery.addresses import PoolError
from hatchery.api.policy import Policy, Scope
from hatchery.api.validate import BadRequest, Body
from hatchery.capacity import CapacityError
from hatchery.containers.oci import ImageRefused
from hatchery.containers.signed import ReferenceError
from hatchery.containers.store import ContainerNotFound
from hatchery.errors import HatcheryError
from hatchery.images.fetch import FetchError
from hatchery.images.manifest import ManifestError
from hatchery.images.running_root import NotRunningRoot
from hatchery.images.signing import VerificationError
from hatchery.images.store import (
    CorruptObject,
    ImageConflict,
    ImageNotFound,
    MissingObjects,
    ObjectNotFound,
)
from hatchery.logs import LogsUnavailable
from hatchery.pki import Identity, identity_from_peercert
from hatchery.revocation import CrlRefused, CrlStale, Revocations
from hatchery.upgrade.controller import UpgradeError
from hatchery.vms.console import ConsoleBusy, ConsoleError
from hatchery.vms.manager import MoveFailed, NotFound, VmError
from hatchery.vms.model import VmStateError
from hatchery.vms.sources import SourceError

log = logging.getLogger(__name__)

#: Largest request body a handler reads unless it names its own limit.
MAX_BODY = 1024 * 1024
#: Set when the app begins to stop: answers held open end (see the module's docstring).
STOPPING = web.AppKey("stopping", asyncio.Event)
_T = TypeVar("_T")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Identify = Callable[[web.Request], Identity | None]
Visible = Callable[[str | None], bool]
OwnerOf = Callable[[web.Request, Visible], Awaitable[str | None]]

IDENTIFY: web.AppKey[Identify] = web.AppKey("identify")
#: The node's revocation list, when the agent has one: ``tls_identity`` refuses its serials.
REVOCATIONS = web.AppKey("revocations", Revocations)
POLICY = web.AppKey("policy", Policy)
IDENTITY = web.RequestKey("identity", Identity)
_RAW_BODY = web.RequestKey("raw_body", bytes)


# --- errors -------------------------------------------------------------------------------------
class Unauthenticated(HatcheryError):
    """The request carries no identity the resolver accepts (no client certificate)."""


class Forbidden(HatcheryError):
    """The caller's groups do not give the permission the route needs."""


class TooLarge(BadRequest):
    """The body is over the route's size limit."""


class Unavailable(HatcheryError):
    """The route exists but this agent was started without the part behind it."""


#: Error type → HTTP status; an error takes the status of its most specific type listed here
#: (``NotFound`` is a ``VmError``: 404, not 400). Anything else is a 500 and is logged.
STATUS: dict[type[HatcheryError], int] = {
    BadRequest: 400,
    ManifestError: 400,
    CrlRefused: 422,
    CrlStale: 409,
    SourceError: 400,
    VmError: 400,
    MoveFailed: 500,  # a refresh or suspend that failed: the VM runs on where it was
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    ObjectNotFound: 404,
    ImageNotFound: 404,
    CapacityError: 409,
    ConsoleBusy: 409,
    ImageConflict: 409,
    NotRunningRoot: 409,
    MissingObjects: 409,
    PoolError: 409,
    VmStateError: 409,
    TooLarge: 413,
    CorruptObject: 422,
    VerificationError: 422,
    FetchError: 502,
    Unavailable: 503,
    ConsoleError: 503,
    LogsUnavailable: 503,
    ReferenceError: 422,
    ImageRefused: 422,
    ContainerNotFound: 404,
}


def status_of(exc: HatcheryError) -> int:
    """The HTTP status for ``exc``, from ``STATUS``.

    The one exception is ``UpgradeError``: the upgrade controller decides between 404, 409
    and 422 itself (its refusals depend on the node's state, not on the error's kind) and
    carries the status in the error.
    """
    if isinstance(exc, UpgradeError):
        return exc.status
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def error_response(
    status: int, message: str, field: str | None = None, hint: str | None = None
) -> web.Response:
    """The one error body: ``{"error": message, "field": ..., "hint": ...}``."""
    return web.json_response({"error": message, "field": field, "hint": hint}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into the one error body; cancellation passes through untouched."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals: no route (404), wrong method (405), body over the app's
        # client_max_size (413).
        return error_response(exc.status, exc.reason or "error")
    except HatcheryError as exc:
        status = status_of(exc)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc.message)
        return error_response(status, exc.message, getattr(exc, "field", None), exc.hint)
    except Exception:
        log.exception("%s %s: internal error", request.method, request.path)
        return error_response(500, "internal error (see the agent's log)")


# --- identity and permission --------------------------------------------------------------------
def tls_identity(request: web.Request) -> Identity | None:
    """The verified client certificate's identity (CN, OUs as groups); None without one, and
    None for a certificate whose extended key usage lacks ``clientAuth`` (a node's
    server-only certificate is no caller), and None for a revoked one.

    The server's TLS context already refuses connections without a certificate signed by
    the fleet's CA, and a revoked one while the CRL is current; this reads the certificate
    the handshake verified, and checks the revoked serials again: that is what refuses them
    while the CRL has expired (``revocation``), and a connection opened before the CRL came.
    """
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        return None
    revocations = request.app.get(REVOCATIONS)
    if revocations is not None and revocations.is_revoked_der(der):
        return None
    return identity_from_peercert(ssl_object.getpeercert(), der)


class Open(Enum):
    """A route that needs no permission beyond a verified identity."""

    ANY_CLIENT = "any verified client"


#: ``@require(ANY_CLIENT)``: health, which every node and operator reads.
ANY_CLIENT = Open.ANY_CLIENT


def require(
    permission: str | Open,
    *,
    owner: OwnerOf | None = None,
    seen_with: str | None = None,
    filtered: bool = False,
) -> Callable[[Handler], Handler]:
    """The guard every handler starts with: identify the caller, then check ``permission``.

    Without ``owner`` the permission must hold on everything (an unscoped grant). With
    ``owner``, the route is about an object that has an owner group (a VM) and a scoped
    grant (``vm.manage:own``) for that group is enough. A caller who holds the permission
    nowhere gets its 403 before anything is looked up or read. ``owner`` is then asked for
    the object's owner group; it gets a ``visible`` test and must answer an object the caller
    may not see exactly like a missing one (a 404), so that no one learns another group's
    names. Visible means: ``seen_with`` (``vm.read``) or ``permission`` covers its owner.
    ``filtered`` is for lists: any identified caller gets through and the handler keeps only
    the items ``allowed`` lets them see. The guarded handler carries ``permission`` so a test
    can check that no route goes unguarded.
    """
    if filtered and (owner is not None or isinstance(permission, Open)):
        raise ValueError("a filtered route checks its permission per item, not per request")

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            who = request.app[IDENTIFY](request)
            if who is None:
                raise Unauthenticated(
                    "a client certificate is required",
                    hint="hatchery ca issue makes one; pass it with --cert/--key",
                )
            request[IDENTITY] = who
            if isinstance(permission, str) and not filtered:
                await _check(request, who, permission, owner, seen_with)
            return await handler(request)

        guarded.permission = permission  # type: ignore[attr-defined]
        return guarded

    return wrap


async def _check(
    request: web.Request,
    who: Identity,
    permission: str,
    owner: OwnerOf | None,
    seen_with: str | None,
) -> None:
    policy = request.app[POLICY]
    scope = policy.scope(who, permission)
    seen = policy.scope(who, seen_with) if seen_with is not None else Scope()
    groups = ", ".join(sorted(who.groups)) or "none"
    refusal = f"{who.name} (groups: {groups}) may not {permission}"
    if owner is None:
        if not scope.everything:
            raise Forbidden(refusal)
        return
    if not scope and not seen:
        raise Forbidden(refusal)  # depends on the identity only: tells nothing about objects

    def visible(owner_group: str | None) -> bool:
        return scope.covers(owner_group) or seen.covers(owner_group)

    owner_group = await owner(request, visible)
    if not scope.covers(owner_group):
        target = f"owner group {owner_group}" if owner_group else "a vm without an owner group"
        raise Forbidden(f"{refusal} for {target}")


def caller(request: web.Request) -> Identity:
    """Who sent ``request`` (set by ``require``, which ran before the handler)."""
    return request[IDENTITY]


def allowed(request: web.Request, permission: str, owner_group: str | None = None) -> bool:
    """Whether the caller holds ``permission`` on an object of ``owner_group`` (for lists:
    a scoped grant counts for the objects its group owns)."""
    return request.app[POLICY].allows(caller(request), permission, owner_group)


# --- bodies ----------------------------------------------------------------------------------
async def read_body(request: web.Request, limit: int = MAX_BODY, field: str | None = None) -> bytes:
    """The body, at most ``limit`` bytes (``TooLarge`` above it, before reading it all when
    the client announced its length). Read once and kept on the request, so the guard may
    look at it before the handler."""
    if _RAW_BODY in request:
        data = request[_RAW_BODY]
    else:
        if request.content_length is not None and request.content_length > limit:
            raise TooLarge(f"the body is larger than {limit} bytes", field)
        chunks = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            chunks += chunk
            if len(chunks) > limit:
                raise TooLarge(f"the body is larger than {limit} bytes", field)
        data = request[_RAW_BODY] = bytes(chunks)
    if len(data) > limit:
        raise TooLarge(f"the body is larger than {limit} bytes", field)
    return data


async def json_body(request: web.Request, limit: int = MAX_BODY) -> Body:
    """The body as a JSON object to read field by field (``validate.Body``)."""
    return Body.parse(await read_body(request, limit))


def new_app(
    policy: Policy, identify: Identify = tls_identity, middlewares: tuple[Middleware, ...] = ()
) -> web.Application:
    """An app with the shared layer in place: error bodies, the identity resolver, the
    policy. ``middlewares`` run inside the error handling (tests use them to record or cut
    requests)."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors_middleware, *middlewares])
    app[POLICY] = policy
    app[IDENTIFY] = identify
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.insert(0, _stopping)  # before the answers in flight are waited for
    return app


async def _stopping(app: web.Application) -> None:
    app[STOPPING].set()


async def hold(request: web.Request, seconds: float) -> bool:
    """Wait ``seconds`` unless the agent begins to stop first; False once it stops."""
    stopping = request.app[STOPPING]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), max(seconds, 0.0))
    return not stopping.is_set()


async def until_stopping(request: web.Request, items: AsyncIterator[_T]) -> AsyncGenerator[_T]:
    """``items`` until they end or the agent begins to stop, whichever comes first. The item
    being awaited then, or when the caller is cancelled (its client left), is cancelled and
    waited for here, so the caller can close ``items`` (a generator still running in another
    task could not be closed, and its ``journalctl`` would live on)."""
    stopping = asyncio.ensure_future(request.app[STOPPING].wait())
    item: asyncio.Future[_T] | None = None
    try:
        while True:
            item = asyncio.ensure_future(anext(items))
            await asyncio.wait((item, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                return
            try:
                value = item.result()
            except StopAsyncIteration:
                return
            item = None
            yield value
    finally:
        stopping.cancel()
        if item is not None and not item.done():
            item.cancel()
            await asyncio.gather(item, return_exceptions=True)
