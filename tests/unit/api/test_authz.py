"""Tenant isolation at the API: a request body never grants a permission (issue 14).

Permissions come from the certificate's groups and the policy only. A group reaches its own
VMs through a grant scoped to it (``vm.manage:own``); a ``reader`` or ``node`` certificate
that names its own group as ``owner_group`` gets nothing for it; a VM the caller may not see
answers exactly like a missing one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hatchery.api.policy import (
    DEFAULT_OTHER_GROUPS,
    DEFAULT_POLICY,
    Policy,
    check_pattern,
    default_policy,
    load_policy,
)
from hatchery.errors import ConfigError
from hatchery.pki import Identity
from tests.unit.api.conftest import ADMIN, READER, Api, who

NODE = who("node-a", "node")
WEB = who("walt", "web")
DB = who("dora", "db")


def _vm(api: Api, name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kernel": {"kernel": str(api.kernel)}, "start": False, **extra}


@pytest.mark.parametrize(
    ("headers", "group"),
    [(READER, "reader"), (NODE, "node"), (who("x", "reader", "node"), "node")],
)
async def test_naming_your_own_group_grants_nothing(
    api: Api, headers: dict[str, str], group: str
) -> None:
    # The old guard let any member of the body's owner_group create: a reader or any agent
    # (every node holds a node certificate) could start VMs on every node.
    resp = await api.client.post("/v1/vms", json=_vm(api, "evil", owner_group=group),
                                 headers=headers)  # fmt: skip
    assert resp.status == 403, await resp.text()
    assert api.manager.records() == []


async def test_a_node_certificate_cannot_touch_vms(api: Api) -> None:
    assert (await api.client.post("/v1/vms", json=_vm(api, "a1"), headers=ADMIN)).status == 201
    assert (await api.client.delete("/v1/vms/a1", headers=NODE)).status == 403
    assert (await api.client.post("/v1/vms/a1/stop", headers=NODE)).status == 403
    assert (await api.client.get("/v1/vms/a1", headers=NODE)).status == 403
    listed = await (await api.client.get("/v1/vms", headers=NODE)).json()
    assert listed["vms"] == []
    # What a node is for still works.
    assert (await api.client.get("/v1/images", headers=NODE)).status == 200
    assert (await api.client.get("/metrics", headers=NODE)).status == 200
    assert [vm.name for vm in api.manager.records()] == ["a1"]


async def test_another_groups_vm_looks_missing(api: Api) -> None:
    made = await api.client.post("/v1/vms", json=_vm(api, "db1", owner_group="db"), headers=DB)
    assert made.status == 201
    for method, tail in (("GET", ""), ("DELETE", ""), ("POST", "/start"), ("POST", "/stop"),
                         ("GET", "/console"), ("PUT", "/user-data"), ("GET", "/console/attach"),
                         ("GET", "/console/attach?mode=read")):  # fmt: skip
        theirs = await api.client.request(method, f"/v1/vms/db1{tail}", headers=WEB)
        missing = await api.client.request(method, f"/v1/vms/nope{tail}", headers=WEB)
        assert theirs.status == missing.status == 404, (method, tail)
        body, missing_body = await theirs.json(), await missing.json()
        assert body == {**missing_body, "error": missing_body["error"].replace("nope", "db1")}
    assert (await api.client.get("/v1/vms/db1", headers=DB)).status == 200
    assert [vm["name"] for vm in (await (await api.client.get(
        "/v1/vms", headers=WEB)).json())["vms"]] == []  # fmt: skip
    assert [vm.name for vm in api.manager.records()] == ["db1"]


async def test_a_vm_without_owner_is_hidden_from_tenants(api: Api) -> None:
    assert (await api.client.post("/v1/vms", json=_vm(api, "ops1"), headers=ADMIN)).status == 201
    assert (await api.client.get("/v1/vms/ops1", headers=WEB)).status == 404
    create = await api.client.post("/v1/vms", json=_vm(api, "w1"), headers=WEB)  # no owner
    assert create.status == 403
    assert "for a vm without an owner group" in (await create.json())["error"]


async def test_a_reader_sees_but_does_not_manage(api: Api) -> None:
    made = await api.client.post("/v1/vms", json=_vm(api, "w1", owner_group="web"), headers=WEB)
    assert made.status == 201
    assert (await api.client.get("/v1/vms/w1", headers=READER)).status == 200
    assert (await api.client.delete("/v1/vms/w1", headers=READER)).status == 403
    assert (await api.client.delete("/v1/vms/w1", headers=WEB)).status == 200


def test_scoped_grants_hold_for_the_grants_group_only() -> None:
    policy = Policy({"web": ("vm.manage:own",), "reader": ("*.read",)})
    walt = Identity("walt", frozenset({"web", "reader"}))
    assert policy.allows(walt, "vm.manage", "web")
    assert not policy.allows(walt, "vm.manage", "reader")  # reader has no :own grant
    assert not policy.allows(walt, "vm.manage")  # not on everything
    assert policy.allows(walt, "vm.read", "db")  # reader's unscoped read
    scope = policy.scope(walt, "vm.manage")
    assert scope and not scope.everything and scope.groups == {"web"}
    assert not policy.scope(Identity("n", frozenset()), "vm.read")


def test_the_default_policy_is_explicit() -> None:
    policy = default_policy()
    assert policy.groups == DEFAULT_POLICY and policy.other_groups == DEFAULT_OTHER_GROUPS
    assert load_policy(None) == policy
    for group in ("reader", "node"):
        member = Identity("m", frozenset({group}))
        assert not policy.scope(member, "vm.manage"), group
    node = Identity("n", frozenset({"node"}))
    assert not policy.scope(node, "vm.read")
    assert policy.allows(node, "images.read") and policy.allows(node, "health.read")
    tenant = Identity("t", frozenset({"web"}))
    assert policy.allows(tenant, "vm.manage", "web") and not policy.allows(tenant, "vm.manage")
    assert policy.allows(tenant, "vm.console", "web") and not policy.allows(tenant, "vm.console")
    # The node's logs show every tenant's VM names: ops and admin by name, not "*.read".
    for group, logs in (("admin", True), ("ops", True), ("reader", False), ("web", False),
                        ("node", False)):  # fmt: skip
        member = Identity("m", frozenset({group}))
        assert policy.allows(member, "node.logs.read") is logs, group
        assert policy.allows(member, "vm.console", "web") is (group in ("admin", "ops", "web"))
    for pattern in (*DEFAULT_OTHER_GROUPS, *(p for ps in DEFAULT_POLICY.values() for p in ps)):
        check_pattern(pattern, "default")


@pytest.mark.parametrize(
    "pattern", ["vm.manage:all", "pool.manage:own", "*:own", "vm manage", "", "vm.", "*.read:own"]
)
def test_a_bad_pattern_is_refused(pattern: str) -> None:
    with pytest.raises(ConfigError):
        check_pattern(pattern, "groups.web")


def test_policy_file_with_other_groups(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("groups:\n  admin: ['*']\nother_groups: [vm.read:own]\n")
    policy = load_policy(path)
    tenant = Identity("t", frozenset({"web"}))
    assert policy.allows(tenant, "vm.read", "web") and not policy.allows(tenant, "vm.manage", "web")
    path.write_text("groups:\n  web: [vm.manage:mine]\n")
    with pytest.raises(ConfigError, match="groups.web"):
        load_policy(path)
    path.write_text("groups: {}\nextra: 1\n")
    with pytest.raises(ConfigError, match="extra"):
        load_policy(path)


def test_a_star_segment_stands_for_one_segment() -> None:
    """``*.read`` is "read any area", not "read any part of any area": ``node.logs.read``
    is granted by name (or by ``node.logs.*``, ``node.*.read``, ``*``)."""
    check_pattern("node.logs.read", "groups.ops")
    check_pattern("node.*.read", "groups.ops")
    with pytest.raises(ConfigError):
        check_pattern("a.b.c.d", "groups.ops")
    policy = Policy({"r": ("*.read",), "o": ("node.*.read",), "v": ("vm.*",), "a": ("*",)})
    for group, permission, granted in (
        ("r", "vm.read", True), ("r", "node.logs.read", False), ("o", "node.logs.read", True),
        ("o", "vm.read", False), ("v", "vm.console", True), ("v", "vm.x.read", False),
        ("a", "node.logs.read", True),
    ):  # fmt: skip
        assert policy.allows(Identity("m", frozenset({group})), permission) is granted
