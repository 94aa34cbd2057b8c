"""The API over real mutual TLS on loopback: bad input is a 400 naming the field."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery.addresses import AddressPool, Subnet
from hatchery.api.app import ApiContext, make_app
from hatchery.api.policy import load_policy
from hatchery.api.server import ApiServer
from hatchery.capacity import HostCapacity
from hatchery.client import AgentClient, ApiError, Credentials
from hatchery.config import VmSourcesConfig
from hatchery.health import NodeHealth
from hatchery.pki import server_context
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import VmManager
from hatchery.vms.sources import SourceFetcher
from hatchery_lab.agent import Pki


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[AgentClient, VmManager, Path]]:
    pki = Pki.make(tmp_path / "pki")
    admin = pki.client("admin", "admin")
    pool = AddressPool(tmp_path / "pool.db")
    pool.add_subnet(Subnet("br0", ipaddress.IPv4Network("10.5.0.0/24"), None, ()))
    pool.add_range(ipaddress.IPv4Address("10.5.0.10"), ipaddress.IPv4Address("10.5.0.19"))
    artefacts = tmp_path / "artefacts"
    artefacts.mkdir()
    sources = SourceFetcher(VmSourcesConfig(folders=(artefacts,)))
    manager = VmManager(tmp_path, pool, HostCapacity(8, 4096, 10_000), AccelChoice(Accel.TCG, "t"),
                        sources=sources)  # fmt: skip
    app = make_app(ApiContext(manager, pool, load_policy(None), NodeHealth("v1"), time.time()))
    server = ApiServer(app, server_context(pki.ca, pki.server.cert, pki.server.key))
    await server.start("127.0.0.1", 0)
    kernel = artefacts / "kernel"
    kernel.write_bytes(b"not really a kernel")
    try:
        async with AgentClient(
            f"127.0.0.1:{server.port}", Credentials(pki.ca, admin.cert, admin.key)
        ) as c:
            yield c, manager, kernel
    finally:
        await server.close()
        pool.close()


BAD_BODIES: list[tuple[Any, str | None]] = [
    ([], None),
    ({"name": "ok"}, "kernel"),
    ({"name": 5, "kernel": {"kernel": "/k"}}, "name"),
    ({"name": "ok", "kernel": {"kernel": "/k"}, "vcpus": 0}, "vcpus"),
    ({"name": "ok", "kernel": {"kernel": "/k"}, "vcpus": True}, "vcpus"),
    ({"name": "ok", "kernel": {"kernel": "/k"}, "memory_mib": 10**12}, "memory_mib"),
    ({"name": "ok", "kernel": {"kernel": "/k", "extra": 1}}, "kernel.extra"),
    ({"name": "ok", "kernel": {"kernel": "/k"}, "disk": {"image": "/i"}}, "kernel"),
    ({"name": "ok", "kernel": {"kernel": "/k"}, "machine": "isapc"}, "machine"),
    ({"name": "ok", "kernel": {"kernel": "/k"}, "labels": {"a": 1}}, "labels"),
    ({"name": "ok", "kernel": {"kernel": "/k"}, "nonsense": 1}, "nonsense"),
    ({"name": "x" * 300, "kernel": {"kernel": "/k"}}, "name"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
async def test_bad_create_is_a_400_naming_the_field(
    api: tuple[AgentClient, VmManager, Path], body: Any, field: str | None
) -> None:
    client, manager, _ = api
    with pytest.raises(ApiError) as err:
        await client.request("POST", "/v1/vms", json=body)
    assert err.value.status == 400
    if field:
        assert field in err.value.message
    assert manager.records() == []


async def test_not_json_and_oversized(api: tuple[AgentClient, VmManager, Path]) -> None:
    client, manager, _ = api
    with pytest.raises(ApiError) as err:
        await client.request("POST", "/v1/vms", data=b"{not json")
    assert err.value.status == 400 and "not valid JSON" in err.value.message
    with pytest.raises(ApiError) as err:
        await client.request("POST", "/v1/vms", data=b"[" + b" " * (2 * 1024 * 1024) + b"]")
    assert err.value.status == 413
    with pytest.raises(ApiError) as err:
        await client.request("GET", "/v1/vms/nope")
    assert err.value.status == 404
    assert manager.records() == []


async def test_errors_carry_their_hint_to_the_client(
    api: tuple[AgentClient, VmManager, Path],
) -> None:
    client, manager, kernel = api
    with pytest.raises(ApiError) as err:
        await client.request(
            "POST", "/v1/vms", json={"name": "Bad_Name", "kernel": {"kernel": str(kernel)}}
        )
    assert err.value.status == 400 and "bad vm name" in err.value.message
    assert err.value.hint == "1-32 characters: lowercase letters, digits, inner dashes"
    with pytest.raises(ApiError) as err:
        await client.request(
            "POST", "/v1/vms", json={"name": "ok", "kernel": {"kernel": "/k"}, "machine": "microvm"}
        )
    assert err.value.status == 400 and err.value.field == "machine"
    assert "q35, pc" in err.value.message
    assert manager.records() == []


async def test_create_without_start_then_user_data(
    api: tuple[AgentClient, VmManager, Path],
) -> None:
    client, manager, kernel = api
    body = {"name": "a1", "kernel": {"kernel": str(kernel)}, "start": False, "user_data": "#x"}
    vm = await client.request("POST", "/v1/vms", json=body)
    assert vm["state"] == "stopped" and vm["has_user_data"] and "user_data" not in vm
    await client.request("PUT", "/v1/vms/a1/user-data", data=b"#cloud-config\n")
    assert manager.get("a1").user_data == "#cloud-config\n"
    with pytest.raises(ApiError) as err:
        await client.request("POST", "/v1/vms/a1/stop")
    assert err.value.status == 409 and "vm a1 is stopped, cannot stop it" in err.value.message
    metrics = await client.request("GET", "/metrics")
    assert 'hatchery_vms{state="stopped"} 1' in metrics
    assert 'hatchery_pool_addresses{status="free"} 9' in metrics


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
        ),
        max_leaves=12,
    )
)
async def test_fuzzed_bodies_never_500(api: tuple[AgentClient, VmManager, Path], body: Any) -> None:
    client, manager, _ = api
    try:
        await client.request("POST", "/v1/vms", json=body)
    except ApiError as exc:
        assert 400 <= exc.status < 500, exc.message
    for vm in manager.records():
        await manager.destroy(vm.name)
