"""VM sources: a kernel, initrd or disk comes from the store, an artefact folder or a
filtered URL, never from another host path (issue 14). In-process, no QEMU: every VM here
is created with ``start: false``."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hatchery.config import VmSourcesConfig
from hatchery.images.signing import TrustedKeys, load_public_key
from hatchery.vms.manager import SANDBOX, VmError
from hatchery.vms.model import KernelBoot, VmState
from hatchery.vms.sandbox import QemuChannels
from hatchery.vms.sources import SourceError, UrlFetcher, parse_source, refusal
from tests.support.synthetic_images import keypair, signed_build
from tests.unit.api.conftest import ADMIN, Api


async def _create(api: Api, **boot: Any) -> tuple[int, dict[str, Any]]:
    body = {"name": "v1", "start": False, **boot}
    resp = await api.client.post("/v1/vms", json=body, headers=ADMIN)
    return resp.status, await resp.json()


def _secret(api: Api) -> Path:
    secret = api.kernel.parent.parent / "agent.key"  # beside the folder, not in it
    secret.write_bytes(b"PRIVATE KEY")
    return secret


@pytest.mark.parametrize("field", ["kernel", "initrd"])
async def test_a_host_path_outside_the_folders_is_refused(api: Api, field: str) -> None:
    secret = _secret(api)
    boot = {"kernel": str(api.kernel), field: str(secret)}
    status, body = await _create(api, kernel=boot)
    assert status == 400 and body["field"] == f"kernel.{field}", body
    assert "artefact folder" in body["error"] and body["hint"]
    assert api.manager.records() == [] and not (api.kernel.parent.parent / "vms" / "v1").exists()


async def test_a_disk_path_outside_the_folders_is_refused(api: Api) -> None:
    status, body = await _create(api, disk={"image": str(_secret(api)), "format": "raw"})
    assert status == 400 and body["field"] == "disk.image"
    assert api.manager.records() == []


@pytest.mark.parametrize(
    "name", ["../agent.key", "sub/../../agent.key", "link", "dirlink/agent.key", "missing", "sub"]
)
async def test_no_escape_from_a_folder(api: Api, name: str) -> None:
    secret = _secret(api)
    folder = api.kernel.parent
    (folder / "sub").mkdir()
    (folder / "link").symlink_to(secret)
    (folder / "dirlink").symlink_to(secret.parent)
    status, body = await _create(api, kernel={"kernel": f"{folder}/{name}"})
    assert status == 400 and body["field"] == "kernel.kernel", body
    assert api.manager.records() == []


MALFORMED = ["kernel", "./kernel", "file:///etc/passwd", "ftp://x/k", 5, {"image": "v1"},
             {"image": "v1", "artefact": 2}, ""]  # fmt: skip


@pytest.mark.parametrize("value", MALFORMED)
async def test_malformed_sources_name_the_field(api: Api, value: object) -> None:
    status, body = await _create(api, kernel={"kernel": value})
    assert status == 400 and body["field"] == "kernel.kernel", body


async def test_a_file_in_the_folder_is_copied_into_the_vm(api: Api) -> None:
    status, body = await _create(api, kernel={"kernel": str(api.kernel)})
    assert status == 201, body
    copied = Path(body["kernel_boot"]["kernel"])
    assert copied.parent.name == "v1" and copied.read_bytes() == api.kernel.read_bytes()


async def test_a_store_artefact_boots_what_was_signed(api: Api) -> None:
    key = keypair(api.keys.parent)
    build, raw = signed_build(api.keys.parent / "builds", "1.0", key)
    for name in ("hypervisor.vmlinuz", "hypervisor.cpio.zst"):
        api.store.put_file(build / name)
    api.store.add_image(raw, TrustedKeys.of([load_public_key(key.public)]))
    kernel = {"image": "1.0", "artefact": "kernel"}
    initrd = {"image": "1.0", "artefact": "hypervisor.cpio.zst"}  # by file name
    status, body = await _create(api, kernel={"kernel": kernel, "initrd": initrd})
    assert status == 201, body
    boot = body["kernel_boot"]
    assert Path(boot["kernel"]).read_bytes() == (build / "hypervisor.vmlinuz").read_bytes()
    assert Path(boot["initrd"]).read_bytes() == (build / "hypervisor.cpio.zst").read_bytes()
    await api.client.delete("/v1/vms/v1", headers=ADMIN)
    for bad in ({"image": "1.0", "artefact": "disk"}, {"image": "9.9", "artefact": "kernel"}):
        status, body = await _create(api, kernel={"kernel": bad})
        assert status == 400 and body["field"] == "kernel.kernel", body


async def test_a_url_to_the_node_itself_is_refused(api: Api) -> None:
    # A web server on loopback, as the node's own services are: the agent must not fetch
    # from it for a tenant (it did, and handed the answer to the guest).
    seen: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(body=b"node-internal")

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    async with TestServer(app, host="127.0.0.1") as server:
        for url in (f"http://127.0.0.1:{server.port}/k", f"http://localhost:{server.port}/k",
                    f"http://[::ffff:127.0.0.1]:{server.port}/k"):  # fmt: skip
            status, body = await _create(api, kernel={"kernel": str(api.kernel), "initrd": url})
            assert status == 400 and body["field"] == "kernel.initrd", body
            assert "refused" in body["error"]
    assert seen == [] and api.manager.records() == []


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.2", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
        ("0.1.2.3", "this host"), ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"),
        ("2002:7f00:1::", "loopback"), ("64:ff9b::7f00:1", "loopback"), ("::7f00:1", "reserved"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
        ("192.0.2.7", "own"), ("10.9.0.5", "management"), ("fd99::5", "management"),
        ("8.8.8.8", None), ("10.1.2.3", None), ("2001:4860::8888", None),
    ],
)  # fmt: skip
def test_refused_addresses(address: str, why: str | None) -> None:
    own = {ipaddress.ip_address("192.0.2.7")}
    management = (ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_network("fd99::/64"))
    reason = refusal(ipaddress.ip_address(address), own, management)
    assert (reason is None) if why is None else (reason is not None and why in reason), reason


async def test_a_name_is_judged_by_what_it_resolves_to(tmp_path: Path) -> None:
    # (Redirects to refused addresses: tests/integration/agent/test_vm_sources.py, where a
    # server outside the node's addresses exists.)
    fetcher = UrlFetcher(VmSourcesConfig(), own=_no_own)
    with pytest.raises(SourceError, match="loopback") as err:
        await fetcher.fetch("http://localhost:9/x", tmp_path / "out", "disk.image")
    assert err.value.field == "disk.image" and not (tmp_path / "out").exists()


async def _no_own() -> set[str]:
    return set()


def test_parse_source_forms() -> None:
    assert str(parse_source("https://example.org/k", "f")) == "https://example.org/k"
    assert str(parse_source({"image": "v2", "artefact": "vmlinux"}, "f")) == (
        "image v2, artefact vmlinux"
    )
    for bad in ("http://", "https:///path", "relative", "/nul\x00"):
        with pytest.raises(SourceError):
            parse_source(bad, "f")


async def test_qemu_is_sandboxed_and_boots_only_its_own_copies(api: Api) -> None:
    status, body = await _create(api, kernel={"kernel": str(api.kernel)})
    assert status == 201
    vm = api.manager.get("v1")
    log_fd = os.open(os.devnull, os.O_WRONLY)
    channels = QemuChannels(socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX), log_fd)
    qmp_fd, console_fd = channels.qmp.fileno(), channels.console.fileno()
    try:
        argv = api.manager._argv(vm, 3, channels)
    finally:
        channels.close()
    # its sockets and console log are descriptors: QEMU is given no path it would write
    words = " ".join(argv)
    assert f"socket,id=qmp,fd={qmp_fd},server=on" in words
    assert f"socket,id=console,fd={console_fd},server=on" in words
    assert f"-add-fd fd={log_fd},set=1" in words and "logfile=/dev/fdset/1," in words
    assert "path=" not in words and "-qmp" not in argv
    i = argv.index("-sandbox")
    assert argv[i : i + 2] == list(SANDBOX)
    for option in ("obsolete", "elevateprivileges", "spawn", "resourcecontrol"):
        assert f"{option}=deny" in argv[i + 1], option
    assert "-daemonize" not in argv  # it needs the fork and setsid the filter forbids
    # A record from before sources were checked, naming a host path: it does not start.
    old = vm.with_state(VmState.STOPPED, kernel_boot=KernelBoot("/etc/hatchery/tls/agent.key"))
    with pytest.raises(VmError, match="outside its folder"):
        api.manager._argv(old, 3, channels)
    assert os.path.dirname(body["kernel_boot"]["kernel"]).endswith("/vms/v1")


def test_the_cli_names_store_artefacts() -> None:
    from hatchery.cli.vm import _source
    from hatchery.errors import HatcheryError

    assert _source("image:v2:appliance-vm.vmlinux") == {
        "image": "v2",
        "artefact": "appliance-vm.vmlinux",
    }
    assert _source("/data/artefacts/vmlinux") == "/data/artefacts/vmlinux"
    with pytest.raises(HatcheryError):
        _source("image:v2")
