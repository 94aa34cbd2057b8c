"""Fuzz ``POST /v1/vms``: whatever the body and the caller's groups, no 201 without the
permission, and no VM made from a kernel, initrd or disk outside the allowed sources.

Hypothesis drives the real app in-process (the header identity resolver of these tests) with
hostile bodies: owner groups naming the caller's own groups, host paths, ``..`` and symlink
escapes from the artefact folder, URLs to loopback, link-local and the node's addresses in
many spellings, store artefacts that exist and that do not, wrong types, extra fields. The
oracle is written out here from the default policy, not taken from ``api.policy``. No QEMU:
the manager's ``start`` only returns the record. 10 000 examples under CI (``CI=true``,
about a minute on the CI machine), 1 000 on a developer's machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery.addresses import AddressPool, Subnet
from hatchery.api.app import ApiContext, make_app
from hatchery.api.images import ImagesContext
from hatchery.api.policy import load_policy
from hatchery.capacity import HostCapacity
from hatchery.config import VmSourcesConfig
from hatchery.health import NodeHealth
from hatchery.images.signing import KeyDirectory, TrustedKeys, load_public_key
from hatchery.images.store import ImageStore
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.vms.manager import VmManager
from hatchery.vms.model import VmRecord
from hatchery.vms.sources import SourceFetcher
from tests.conftest import FUZZ_EXAMPLES
from tests.support.synthetic_images import keypair, signed_build
from tests.unit.api.conftest import WHO, header_identity

SECRET = b"NODE-PRIVATE-KEY"
LISTED = ("admin", "ops", "reader", "node")
GROUPS = (*LISTED, "web", "db", "")
#: The callers: each listed group alone, tenants, mixtures, nobody.
IDENTITIES = [frozenset(g) for g in (
    {"admin"}, {"ops"}, {"reader"}, {"node"}, {"web"}, {"db"}, {"web", "reader"},
    {"node", "web"}, {"reader", "node"}, {"ops", "web"}, set(),
)]  # fmt: skip


class NoQemu(VmManager):
    """Everything of the real manager up to QEMU: ``start`` is never carried out."""

    async def start(self, name: str) -> VmRecord:
        return self.get(name)


def may_create(groups: frozenset[str], owner: object) -> bool:
    """The default policy, written out: ``vm.manage`` (admin, ops), or a tenant group (one
    the policy does not list) creating for itself."""
    if groups & {"admin", "ops"}:
        return True
    return isinstance(owner, str) and owner in groups and owner not in LISTED


class World:
    """The app, its folder of allowed artefacts, the secrets beside it, a stored image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "artefacts"
        (self.folder / "sub").mkdir(parents=True)
        self.kernel = self.folder / "vmlinuz"
        self.kernel.write_bytes(b"allowed kernel")
        (self.folder / "sub" / "initrd").write_bytes(b"allowed initrd")
        secret = root / "agent.key"
        secret.write_bytes(SECRET)
        (self.folder / "escape").symlink_to(secret)
        (self.folder / "up").symlink_to(root)
        key = keypair(root / "k")
        build, raw = signed_build(root / "builds", "1.0", key)
        self.store = ImageStore(root / "images")
        for name in ("hypervisor.vmlinuz", "hypervisor.cpio.zst"):
            self.store.put_file(build / name)
        self.store.add_image(raw, TrustedKeys.of([load_public_key(key.public)]))
        self.pool = AddressPool(root / "pool.db")
        self.pool.add_subnet(Subnet("br0", ipaddress.IPv4Network("10.5.0.0/24"), None, ()))
        self.pool.add_range(ipaddress.IPv4Address("10.5.0.10"), ipaddress.IPv4Address("10.5.0.20"))
        sources = SourceFetcher(VmSourcesConfig(folders=(self.folder,)), self.store)
        self.manager = NoQemu(root, self.pool, HostCapacity(64, 1 << 30, 1 << 30),
                              AccelChoice(Accel.TCG, "t"), sources=sources)  # fmt: skip
        (root / "image-keys").mkdir()
        # A fetcher that is never reached: no image route is called here.
        tls = ssl.create_default_context()
        images = ImagesContext.build(self.store, KeyDirectory(root / "image-keys"), tls)
        context = ApiContext(self.manager, self.pool, load_policy(None), NodeHealth("v1"),
                             time.time())  # fmt: skip
        self.app = make_app(context, images, identify=header_identity)

    def allowed_file(self, path: object) -> bool:
        """Whether a string source names a regular file inside the folder, symlinks resolved."""
        if not isinstance(path, str) or not path.startswith(f"{self.folder}/"):
            return False
        real = os.path.realpath(path)
        return real.startswith(f"{os.path.realpath(self.folder)}/") and os.path.isfile(real)


HOSTS = ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "0.0.0.0", "0", "127.1",
         "2130706433", "0x7f000001", "[::ffff:127.0.0.1]", "224.0.0.1", "[fe80::1]",
         "192.0.2.2", "[fd00::2]", "0.1.2.3", "255.255.255.255"]  # fmt: skip


def sources(folder: str) -> st.SearchStrategy[Any]:
    paths = st.sampled_from([
        "vmlinuz", "sub/initrd", "escape", "up/agent.key", "../agent.key", "sub/../vmlinuz",
        "sub/../../agent.key", "./vmlinuz", "sub", "missing", "sub//initrd", "vmlinuz/",
        "/etc/passwd", "%2e%2e/agent.key", "escape/", "up/artefacts/vmlinuz",
    ])  # fmt: skip
    good = st.sampled_from([f"{folder}/vmlinuz", f"{folder}/sub/initrd",
                            {"image": "1.0", "artefact": "kernel"}])  # fmt: skip
    return st.one_of(
        good, good, good, good, good, good,  # often enough for the oracle to see successes
        paths.map(lambda p: p if p.startswith("/") else f"{folder}/{p}"),
        st.sampled_from(["/etc/hatchery/tls/agent.key", "/proc/self/environ", "/dev/zero",
                         folder, f"{folder}/../agent.key", "vmlinuz", "", "file:///etc/passwd"]),
        st.builds(lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
                  st.sampled_from(["http", "https"]), st.sampled_from(HOSTS),
                  st.sampled_from(["", ":1", ":6976", ":80"]), st.text(max_size=8)),
        st.fixed_dictionaries({"image": st.sampled_from(["1.0", "9.9", "../1.0", ""]),
                               "artefact": st.sampled_from(["kernel", "initrd", "vmlinux",
                                                            "hypervisor.vmlinuz", "../x"])}),
        st.text(max_size=20).filter(lambda t: not t.startswith(("http:", "https:"))),
        st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2),
        st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    )  # fmt: skip


def bodies(folder: str) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly well-formed bodies with hostile values (so that some pass and the oracle is
    tested on successes), and wild ones."""
    src = sources(folder)
    owner = st.one_of(st.sampled_from(GROUPS), st.text(max_size=5), st.integers(),
                      st.lists(st.sampled_from(GROUPS), max_size=2))  # fmt: skip
    kernel = st.fixed_dictionaries({"kernel": src}, optional={"initrd": src,
                                   "cmdline": st.text(max_size=20)})  # fmt: skip
    disk = st.fixed_dictionaries({"image": src}, optional={
        "format": st.sampled_from(["raw", "qcow2", "vmdk", ""])})  # fmt: skip
    common = {"start": st.booleans(), "owner_group": owner, "vcpus": st.integers(1, 8),
              "machine": st.sampled_from(["q35", "pc"])}  # fmt: skip
    names = st.sampled_from(["f1", "f2", "f3"])
    kernel_boot = st.fixed_dictionaries({"name": names, "kernel": kernel}, optional=common)
    disk_boot = st.fixed_dictionaries({"name": names, "disk": disk}, optional=common)
    wild = st.fixed_dictionaries(
        {"name": st.sampled_from(["f1", "F3", "a" * 40, ""])},
        optional={
            "kernel": kernel, "disk": disk, "start": st.booleans(), "owner_group": owner,
            "vcpus": st.integers(-1, 70), "memory_mib": st.integers(32, 2048),
            "machine": st.sampled_from(["q35", "pc", "microvm"]),
            "labels": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
            "extra": st.integers(),
        },
    )  # fmt: skip
    return st.one_of(kernel_boot, kernel_boot, kernel_boot, disk_boot, wild)


def test_create_never_yields_201_without_permission_or_from_a_bad_source(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(world.app), loop=loop)
    loop.run_until_complete(client.start_server())
    created = 0

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(body=bodies(str(world.folder)),
           groups=st.sampled_from(IDENTITIES),
           owner=st.sampled_from(GROUPS[:-1]),
           raw=st.booleans())  # fmt: skip
    def check(body: dict[str, Any], groups: frozenset[str], owner: str, raw: bool) -> None:
        nonlocal created
        if raw and "owner_group" not in body:
            body = {**body, "owner_group": owner}  # the case that mattered: a group of one's own
        data = json.dumps(body).encode()
        headers = {WHO: f"fuzz:{','.join(sorted(groups))}"}

        async def send() -> tuple[int, Any]:
            resp = await client.post("/v1/vms", data=data, headers=headers)
            return resp.status, await resp.json()

        status, answer = loop.run_until_complete(send())
        assert status in (201, 400, 403, 409), (status, answer)
        if status != 201:
            assert world.manager.records() == []
            assert set(answer) == {"error", "field", "hint"}
            return
        created += 1
        assert may_create(groups, body.get("owner_group")), (groups, body)
        vm = world.manager.records()[0]
        for field, value in (("kernel", (body.get("kernel") or {}).get("kernel")),
                             ("initrd", (body.get("kernel") or {}).get("initrd")),
                             ("disk", (body.get("disk") or {}).get("image"))):  # fmt: skip
            if value is None:
                continue
            assert isinstance(value, dict) or world.allowed_file(value), (field, value)
        for copied in (tmp_path / "vms" / vm.name).iterdir():
            assert SECRET not in copied.read_bytes(), copied
        loop.run_until_complete(world.manager.destroy(vm.name))

    try:
        check()
    finally:
        loop.run_until_complete(client.close())
        loop.close()
        world.pool.close()
    assert created > FUZZ_EXAMPLES // 50  # the oracle saw real successes, not only refusals
