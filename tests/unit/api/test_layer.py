"""The one HTTP layer: every route guarded, one error body, one status table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hatchery.addresses import PoolError
from hatchery.api.app import healthz
from hatchery.api.http import (
    ANY_CLIENT,
    IDENTIFY,
    STATUS,
    Forbidden,
    TooLarge,
    Unauthenticated,
    new_app,
    status_of,
    tls_identity,
)
from hatchery.api.policy import load_policy
from hatchery.api.validate import BadRequest
from hatchery.client import error_from_answer
from hatchery.errors import HatcheryError
from hatchery.images.signing import UnknownKey
from hatchery.images.store import MissingObjects
from hatchery.upgrade.controller import UpgradeError
from hatchery.vms.manager import NotFound, VmError
from tests.support.synthetic_images import keypair, signed_build
from tests.unit.api.conftest import ADMIN, NOBODY, READER, Api, header_identity, who

#: Every route and the permission its guard names: the API's security table in one place.
#: docs/api.md shows the same; a new route fails here until it is added with its guard.
ROUTES: dict[tuple[str, str], object] = {
    ("GET", "/healthz"): ANY_CLIENT,
    ("GET", "/metrics"): "health.read",
    ("GET", "/v1/vms"): "vm.read",  # filtered: each VM by vm.read, or vm.read:own of its group
    ("POST", "/v1/vms"): "vm.manage",
    ("GET", "/v1/vms/{name}"): "vm.read",
    ("DELETE", "/v1/vms/{name}"): "vm.manage",
    ("POST", "/v1/vms/{name}/start"): "vm.manage",
    ("POST", "/v1/vms/{name}/stop"): "vm.manage",
    ("POST", "/v1/vms/{name}/refresh"): "vm.manage",
    ("POST", "/v1/vms/{name}/suspend"): "vm.manage",
    ("GET", "/v1/vms/{name}/console"): "vm.read",
    ("GET", "/v1/vms/{name}/console/attach"): "vm.read",  # a writer needs vm.console too
    ("PUT", "/v1/vms/{name}/user-data"): "vm.manage",
    ("GET", "/v1/pool"): "pool.read",
    ("POST", "/v1/pool"): "pool.manage",
    ("GET", "/v1/subnets"): "pool.read",
    ("POST", "/v1/subnets"): "pool.manage",
    ("GET", "/v1/logs"): "node.logs.read",
    ("GET", "/v1/upgrade"): "upgrade.read",
    ("POST", "/v1/upgrade"): "upgrade.manage",
    ("GET", "/v1/images"): "images.read",
    ("POST", "/v1/images"): "images.manage",
    ("POST", "/v1/images/fetch"): "images.manage",
    ("GET", "/v1/images/{version}"): "images.read",
    ("GET", "/v1/objects/{sha256}"): "images.read",
    ("PUT", "/v1/objects/{sha256}"): "images.manage",
}


def test_every_route_names_its_permission(api: Api) -> None:
    app = api.client.server.app
    assert app is not None
    seen = {}
    for route in app.router.routes():
        if route.method == "HEAD":  # added by aiohttp next to each GET, same handler
            continue
        path = route.resource.canonical if route.resource is not None else "?"
        seen[(route.method, path)] = getattr(route.handler, "permission", "UNGUARDED")
    assert seen == ROUTES


def _is_error_body(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and set(body) == {"error", "field", "hint"}
        and isinstance(body["error"], str)
        and body["error"] != ""
        and all(body[k] is None or isinstance(body[k], str) for k in ("field", "hint"))
    )


@pytest.mark.parametrize(
    ("method", "path", "headers", "data", "status"),
    [
        ("GET", "/v1/vms", {}, None, 401),  # no identity at all
        ("GET", "/v1/pool", NOBODY, None, 403),
        ("POST", "/v1/images", READER, b"{}", 403),
        ("POST", "/v1/vms", ADMIN, b"{not json", 400),
        ("POST", "/v1/vms", ADMIN, b'{"name": "a", "vcpus": "two"}', 400),
        ("PUT", "/v1/objects/nothex", ADMIN, b"x", 400),
        ("GET", "/v1/images/..x", ADMIN, None, 400),
        ("GET", "/v1/vms/nope", ADMIN, None, 404),
        ("GET", "/v1/no-such-route", ADMIN, None, 404),  # aiohttp's own 404
        ("PATCH", "/v1/vms", ADMIN, None, 405),  # aiohttp's own 405
        ("POST", "/v1/vms", ADMIN, b"[" + b" " * (2 * 1024 * 1024) + b"]", 413),
        ("POST", "/v1/images", ADMIN, b"{}", 400),
        ("GET", f"/v1/objects/{'0' * 64}", ADMIN, None, 404),
        ("POST", "/v1/upgrade", ADMIN, b'{"version": "v2"}', 503),  # no upgrader here
    ],
)
async def test_every_error_has_the_one_body(
    api: Api, method: str, path: str, headers: dict[str, str], data: bytes | None, status: int
) -> None:
    resp = await api.client.request(method, path, headers=headers, data=data)
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert _is_error_body(await resp.json())


async def test_bad_input_names_the_field(api: Api) -> None:
    body = {"name": "a1", "kernel": {"kernel": str(api.kernel)}, "vcpus": 0}
    resp = await api.client.post("/v1/vms", json=body, headers=ADMIN)
    answer = await resp.json()
    assert resp.status == 400 and answer["field"] == "vcpus" and "vcpus" in answer["error"]
    assert api.manager.records() == []


async def test_the_hint_reaches_the_client(api: Api) -> None:
    # A manifest whose objects are missing: the store's hint says what to do.
    key = keypair(api.keys.parent)
    (api.keys / f"{key.key_id}.pub").write_bytes(key.public.read_bytes())
    _, raw = signed_build(api.keys.parent / "builds", "1.0", key)
    resp = await api.client.post("/v1/images", data=raw, headers=ADMIN)
    answer = await resp.json()
    assert resp.status == 409 and "missing" in answer["error"]
    assert answer["hint"] == "upload them first (PUT /v1/objects/<sha256>)"
    error = error_from_answer(resp.status, answer)
    assert error.hint == answer["hint"] and error.message.endswith("(HTTP 409)")


async def test_an_internal_error_is_a_500_that_tells_nothing(tmp_path: Path) -> None:
    @web.middleware
    async def boom(request: web.Request, handler: Any) -> web.StreamResponse:
        raise RuntimeError(f"secret detail in {tmp_path}")

    app = new_app(load_policy(None), header_identity, (boom,))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/anything", headers=ADMIN)
        body = await resp.json()
    assert resp.status == 500 and _is_error_body(body)
    assert str(tmp_path) not in body["error"] and "agent's log" in body["error"]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (BadRequest("x", "f"), 400),
        (TooLarge("x"), 413),  # a BadRequest, but the more specific type wins
        (VmError("x"), 400),
        (NotFound("x"), 404),  # a VmError
        (UnknownKey("x"), 422),  # a VerificationError
        (MissingObjects("x", []), 409),
        (PoolError("x"), 409),
        (Unauthenticated("x"), 401),
        (Forbidden("x"), 403),
        (UpgradeError("x", 422), 422),  # the upgrade controller picks its own status
        (UpgradeError("x", 404), 404),
        (HatcheryError("x"), 500),  # not in the table: a server-side failure
    ],
)
def test_status_table(error: HatcheryError, status: int) -> None:
    assert status_of(error) == status


def test_the_status_table_has_only_client_or_upstream_errors() -> None:
    assert all(400 <= code < 600 for code in STATUS.values())


async def test_the_guard_runs_before_the_body_is_read(api: Api) -> None:
    # A caller without the permission learns nothing from validation: 403, not 400.
    for path, data in (("/v1/vms", b"{not json"), ("/v1/pool", b'{"start": 5}')):
        resp = await api.client.post(path, data=data, headers=READER)
        assert resp.status == 403, path
        assert "rita (groups: reader) may not" in (await resp.json())["error"]


async def test_owner_group_acts_on_its_own_vms_only(api: Api) -> None:
    team = who("walt", "web")
    mine = {"name": "web1", "kernel": {"kernel": str(api.kernel)}, "start": False}
    theirs = {"name": "db1", "kernel": {"kernel": str(api.kernel)}, "start": False}
    created = await api.client.post("/v1/vms", json={**mine, "owner_group": "web"}, headers=team)
    assert created.status == 201
    refused = await api.client.post("/v1/vms", json={**theirs, "owner_group": "db"}, headers=team)
    assert refused.status == 403
    no_owner = await api.client.post("/v1/vms", json=theirs, headers=team)
    assert no_owner.status == 403
    assert (await api.client.post("/v1/vms", json=theirs, headers=ADMIN)).status == 201

    listed = await (await api.client.get("/v1/vms", headers=team)).json()
    assert [vm["name"] for vm in listed["vms"]] == ["web1"]
    assert (await api.client.get("/v1/vms/web1", headers=team)).status == 200
    assert (await api.client.get("/v1/vms/db1", headers=team)).status == 404  # unseen = missing
    assert (await api.client.delete("/v1/vms/db1", headers=team)).status == 404
    assert (await api.client.get("/v1/vms", headers=NOBODY)).status == 200
    assert [vm.name for vm in api.manager.records()] == ["db1", "web1"]


async def test_health_needs_only_an_identity(api: Api) -> None:
    assert (await api.client.get("/healthz")).status == 401
    health = await api.client.get("/healthz", headers=NOBODY)
    assert health.status == 200 and (await health.json())["version"] == "v1"
    assert (await api.client.get("/v1/upgrade", headers=NOBODY)).status == 403
    assert (await api.client.get("/metrics", headers=NOBODY)).status == 403


async def test_tls_identity_without_a_certificate_is_nobody(api: Api) -> None:
    # The in-process server speaks plain HTTP: the agent's resolver finds no certificate.
    app = new_app(load_policy(None))
    assert app[IDENTIFY] is tls_identity  # the default: what the agent runs
    app.router.add_get("/healthz", healthz)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/healthz", headers=ADMIN)  # a header proves nothing
        assert resp.status == 401
        assert "client certificate" in (await resp.json())["error"]


def test_error_from_answer_reads_the_one_body() -> None:
    error = error_from_answer(400, {"error": "vcpus must be an integer", "field": "vcpus",
                                    "hint": None})  # fmt: skip
    assert error.message == "vcpus must be an integer (HTTP 400)"
    assert error.field == "vcpus" and error.hint is None and error.status == 400
    proxy = error_from_answer(502, "<html>bad gateway</html>")
    assert proxy.message == "<html>bad gateway</html> (HTTP 502)" and proxy.hint is None
