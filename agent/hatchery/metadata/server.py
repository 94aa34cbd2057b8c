"""The metadata HTTP server: a VM sees only its own data, identified by its source address.

The address is trustworthy because the bridge's anti-spoofing rules (``ruleset``) drop any
frame from a VM port whose MAC, IPv4 or ARP claims are not that VM's. Served:

* SmallStack: ``/datasource/SmallStack``, ``/latest/dynamic/epoch-time`` (seconds.nanoseconds),
  ``/latest/dynamic/instance-identity/document``, ``/latest/user-data``;
* EC2-style ``/latest/meta-data/`` (instance-id, local-ipv4, hostname, local-hostname, mac,
  public-keys/) with IMDSv2 session tokens (``PUT /latest/api/token``, see ``_Tokens``);
* NoCloud ``/nocloud/{meta-data,user-data,vendor-data}`` for stock cloud-init, which the
  agent points guests at through the SMBIOS serial ``ds=nocloud-net;s=http://169.254.169.254/nocloud/``;
* for container VMs (HyperVM): ``/hatchery/container`` (the VM's image and its single-use
  token, once per boot) and ``/hatchery/container/bundle`` (the image, for that token:
  ``containers.service``).

Anything else is a 404; anything but GET/PUT a 405; bodies over 1 KiB are refused.

IMDSv2 tokens, as EC2 has them: ``PUT /latest/api/token`` with
``X-aws-ec2-metadata-token-ttl-seconds: 1..21600`` answers a token, valid for that VM only
(its uuid and source address) until the TTL ends; a request carrying a token that is not
the VM's own, or expired, is a 401. A PUT with ``X-Forwarded-For`` is refused, as EC2 does,
so a proxy in the guest that forwards requests cannot fetch a token for someone else. With
``require_token`` (the bridge's ``metadata: {require_token: true}``), every GET needs a
valid token (401 without): what protects a guest whose application can be made to send GET
requests (SSRF). It is off by default because stock cloud-init's NoCloud datasource (what
the SMBIOS serial points guests at) and the SmallStack clients send plain GETs; cloud-init's
EC2 datasource asks for a token first and works either way.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from hatchery.containers.service import ContainerService, Refusal
from hatchery.errors import HatcheryError
from hatchery.log import EventSummary

log = logging.getLogger(__name__)
TOKEN_HEADER = "X-aws-ec2-metadata-token"
CONTAINER_TOKEN_HEADER = "X-Hatchery-Container-Token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKENS_PER_VM = 16
MAX_VMS = 4096
MAX_TTL = 21600  # seconds: EC2's limit


@dataclass(frozen=True, slots=True)
class VmMetadata:
    name: str
    uuid: str
    ip: str
    mac: str
    user_data: str = ""
    public_keys: tuple[str, ...] = ()
    created: float = 0.0
    started: float = 0.0  # this boot (a container token is made once per boot)
    container_image: str = ""  # NAME:TAG for a container VM
    container_env: tuple[tuple[str, str], ...] = ()
    container_ports: tuple[int, ...] = ()

    def identity_document(self) -> dict[str, object]:
        """The guest's own facts, nothing of its host: no node name or address, which would
        let tenants tell which VMs share a host (co-residency, the first step of a
        cross-VM side-channel attack). EC2's document names no host either."""
        return {
            "instanceId": self.uuid,
            "instanceName": self.name,
            "privateIp": self.ip,
            "macAddress": self.mac,
            "hostname": self.name,
            "launchTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
        }


class MetadataSource(Protocol):
    """What the server needs: the VM on this bridge that owns this address, if any."""

    def vm_by_ip(self, bridge: str, ip: str) -> VmMetadata | None: ...


class _Tokens:
    """IMDSv2 session tokens, one small table per VM, so that no VM can evict another's.

    Each VM (its uuid and source address) keeps at most ``per_vm`` live tokens, its oldest
    dropped first when it asks for more; at most ``max_vms`` VMs hold tokens at once, the VM
    that asked least recently losing its table first (only VMs the bridge knows ever get
    this far, so in practice the bound is the bridge's VMs). Expired tokens are dropped when
    their VM asks again, and every VM's when the table of VMs is full.
    """

    def __init__(self, per_vm: int = TOKENS_PER_VM, max_vms: int = MAX_VMS) -> None:
        self.per_vm = per_vm
        self.max_vms = max_vms
        self._by_vm: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def issue(self, vm: str, ttl: int, now: float) -> str:
        tokens = self._by_vm.get(vm)
        if tokens is None:
            if len(self._by_vm) >= self.max_vms:
                self._prune(now)
            while len(self._by_vm) >= self.max_vms:
                self._by_vm.popitem(last=False)
            tokens = self._by_vm[vm] = OrderedDict()
        self._by_vm.move_to_end(vm)
        for token in [t for t, expiry in tokens.items() if expiry <= now]:
            del tokens[token]
        while len(tokens) >= self.per_vm:
            tokens.popitem(last=False)
        token = secrets.token_urlsafe(32)
        tokens[token] = now + ttl
        return token

    def valid(self, token: str, vm: str, now: float) -> bool:
        tokens = self._by_vm.get(vm)
        expiry = tokens.get(token) if tokens is not None else None
        return expiry is not None and expiry > now

    def count(self, vm: str) -> int:
        """Tokens held for ``vm`` (for tests and metrics)."""
        return len(self._by_vm.get(vm, {}))

    def _prune(self, now: float) -> None:
        for vm, tokens in list(self._by_vm.items()):
            for token in [t for t, expiry in tokens.items() if expiry <= now]:
                del tokens[token]
            if not tokens:
                del self._by_vm[vm]


def _holder(vm: VmMetadata, remote: str) -> str:
    """Whose tokens: the VM's uuid and the address it asked from (a token is good for both)."""
    return f"{vm.uuid}@{remote}"


VM = web.RequestKey("vm", VmMetadata)
BRIDGE = web.AppKey("bridge", str)
SOURCE = web.AppKey("source", MetadataSource)
TOKENS = web.AppKey("tokens", _Tokens)
REQUIRE_TOKEN = web.AppKey("require_token", bool)
CONTAINERS = web.AppKey("containers", ContainerService)
# Anything on the bridge can reach 169.254.169.254: refusals are summarised, not logged each.
REFUSALS = web.AppKey("refusals", EventSummary)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _text(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/plain")


@web.middleware
async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer only a known VM, by source address; an IMDSv2 token, if given, must be its own."""
    if request.body_exists:
        await request.read()  # over client_max_size: 413 before anything else happens
    remote = request.remote or ""
    try:
        ipaddress.IPv4Address(remote)
    except ValueError:
        raise web.HTTPForbidden(text="unknown source\n") from None
    vm = request.app[SOURCE].vm_by_ip(request.app[BRIDGE], remote)
    if vm is None:
        request.app[REFUSALS].count("requests from unknown addresses refused", remote)
        raise web.HTTPForbidden(text="unknown source\n")
    token = request.headers.get(TOKEN_HEADER)
    if token is not None:
        if not request.app[TOKENS].valid(token, _holder(vm, remote), time.time()):
            request.app[REFUSALS].count("requests with an invalid or expired token", remote)
            raise web.HTTPUnauthorized(text="invalid or expired token\n")
    elif request.app[REQUIRE_TOKEN] and request.method != "PUT":
        raise web.HTTPUnauthorized(text="a token is required: PUT /latest/api/token first\n")
    request[VM] = vm
    return await handler(request)


async def put_token(request: web.Request) -> web.Response:
    if "X-Forwarded-For" in request.headers:
        raise web.HTTPForbidden(text="a token is not issued through a proxy\n")
    try:
        ttl = int(request.headers.get(TTL_HEADER, ""))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{TTL_HEADER} must be 1..{MAX_TTL}\n") from None
    if not 1 <= ttl <= MAX_TTL:
        raise web.HTTPBadRequest(text=f"{TTL_HEADER} must be 1..{MAX_TTL}\n")
    holder = _holder(request[VM], request.remote or "")
    token = request.app[TOKENS].issue(holder, ttl, time.time())
    return web.Response(text=token, headers={TTL_HEADER: str(ttl)}, content_type="text/plain")


async def smallstack(request: web.Request) -> web.Response:
    return _text("true")


async def epoch_time(request: web.Request) -> web.Response:
    ns = time.time_ns()
    return _text(f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}")


async def identity_document(request: web.Request) -> web.Response:
    return web.json_response(request[VM].identity_document())


async def user_data(request: web.Request) -> web.Response:
    vm = request[VM]
    if not vm.user_data:
        raise web.HTTPNotFound(text="no user data\n")
    return _text(vm.user_data)


_META_KEYS = ("hostname", "instance-id", "local-hostname", "local-ipv4", "mac", "public-keys/")


async def meta_data_index(request: web.Request) -> web.Response:
    return _text("\n".join(_META_KEYS))


async def meta_data_item(request: web.Request) -> web.Response:
    vm = request[VM]
    values = {
        "hostname": vm.name,
        "local-hostname": vm.name,
        "instance-id": vm.uuid,
        "local-ipv4": vm.ip,
        "mac": vm.mac,
    }
    key = request.match_info["key"]
    if key in values:
        return _text(values[key])
    raise web.HTTPNotFound(text="no such key\n")


async def public_keys(request: web.Request) -> web.Response:
    keys = request[VM].public_keys
    return _text("\n".join(f"{i}=key{i}" for i in range(len(keys))))


async def public_key(request: web.Request) -> web.Response:
    keys = request[VM].public_keys
    index = request.match_info["index"]
    if not index.isdigit() or int(index) >= len(keys):
        raise web.HTTPNotFound(text="no such key\n")
    if request.match_info.get("rest", "") in ("", "openssh-key"):
        return _text(keys[int(index)])
    raise web.HTTPNotFound(text="no such key\n")


async def nocloud_meta_data(request: web.Request) -> web.Response:
    vm = request[VM]
    lines = [f"instance-id: {vm.uuid}", f"local-hostname: {vm.name}"]
    if vm.public_keys:
        lines.append("public-keys:")
        lines += [f"  - {json.dumps(k)}" for k in vm.public_keys]
    return _text("\n".join(lines) + "\n")


async def nocloud_user_data(request: web.Request) -> web.Response:
    # cloud-init needs the file to exist; an empty one means "no user data".
    return _text(request[VM].user_data)


async def nocloud_vendor_data(request: web.Request) -> web.Response:
    return _text("")


def _containers(request: web.Request) -> ContainerService:
    service = request.app.get(CONTAINERS)
    if service is None:
        raise web.HTTPNotFound(text="this node runs no containers\n")
    return service


async def container_ticket(request: web.Request) -> web.Response:
    try:
        return _text(_containers(request).ticket(request[VM]))
    except Refusal as exc:
        return web.Response(status=exc.status, text=exc.message + "\n")


async def container_bundle(request: web.Request) -> web.StreamResponse:
    """The VM's image, once, for its token; refusals (token, image) say why in the body."""
    token = request.headers.get(CONTAINER_TOKEN_HEADER, "")
    try:
        download = await _containers(request).download(request[VM], token)
    except Refusal as exc:
        return web.Response(status=exc.status, text=exc.message)
    response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
    response.content_length = download.size
    await response.prepare(request)
    try:
        async for chunk in download.chunks:
            await response.write(chunk)
    except HatcheryError as exc:  # the VM sees a short read and refuses the bundle
        log.warning("vm %s: container download cut: %s", request[VM].name, exc)
        if request.transport is not None:
            request.transport.close()
        return response
    finally:  # a VM that went away mid-download: the archive is closed now, not at GC
        await download.chunks.aclose()
    await response.write_eof()
    return response


def make_app(
    bridge: str,
    source: MetadataSource,
    *,
    require_token: bool = False,
    containers: ContainerService | None = None,
) -> web.Application:
    """The metadata app of ``bridge``; ``require_token``: every GET needs an IMDSv2 token;
    ``containers``: container VMs get their image here."""
    app = web.Application(client_max_size=1024, middlewares=[identify])
    if containers is not None:
        app[CONTAINERS] = containers
    app[BRIDGE] = bridge
    app[SOURCE] = source
    app[TOKENS] = _Tokens()
    app[REQUIRE_TOKEN] = require_token
    app[REFUSALS] = EventSummary(log, f"metadata on {bridge}")
    r = app.router
    r.add_put("/latest/api/token", put_token)
    r.add_get("/datasource/SmallStack", smallstack)
    r.add_get("/latest/dynamic/epoch-time", epoch_time)
    r.add_get("/latest/dynamic/instance-identity/document", identity_document)
    r.add_get("/latest/user-data", user_data)
    r.add_get("/latest/meta-data/", meta_data_index)
    r.add_get("/latest/meta-data/public-keys/", public_keys)
    r.add_get("/latest/meta-data/public-keys/{index}/", public_key)
    r.add_get("/latest/meta-data/public-keys/{index}/{rest}", public_key)
    r.add_get("/latest/meta-data/{key}", meta_data_item)
    r.add_get("/nocloud/meta-data", nocloud_meta_data)
    r.add_get("/nocloud/user-data", nocloud_user_data)
    r.add_get("/nocloud/vendor-data", nocloud_vendor_data)
    r.add_get("/hatchery/container", container_ticket)
    r.add_get("/hatchery/container/bundle", container_bundle)
    return app
