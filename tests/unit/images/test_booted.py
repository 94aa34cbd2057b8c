"""A node born over the network takes the image it runs into its own store from its birth
peer (``images.booted``): the real export (``netboot``) served by the real boot HTTP service
on loopback; the node's running root image is a file here (a loop device on a node; the
demo shows the real one). What the peer sends is hostile: an untrusted signature, another
version, bytes that do not hash, answers to the wrong range; each is refused with the store
unchanged. A hostile server, where one is needed, is an aiohttp app of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import ipaddress
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from hatchery.boothttp.app import BootHttpConfig, BootHttpServer
from hatchery.config import BootServiceConfig
from hatchery.images.booted import (
    PROBE,
    Adopted,
    BootedImageError,
    adopt_booted_image,
    adopt_with_retries,
)
from hatchery.images.manifest import SIGNED_NAME
from hatchery.images.signing import KeyDirectory, VerificationError
from hatchery.images.store import CorruptObject, ImageStore
from hatchery.netboot import Netboot
from hatchery.seed import birth_origin
from hatchery.upgrade.archive import root_image_range
from hatchery_lab.cpio_writer import Entry, write_newc
from tests.support.synthetic_images import keypair, signed_build
from tests.support.upgrade_roots import live_initrd

ROOT_SIZE = 3 * (1 << 20) + 12345  # several pieces, not aligned


@dataclass
class Birth:
    """A birth peer exporting v1 over its boot HTTP service, and the newborn's side."""

    origin: str
    export: Path  # the peer's exported folder of v1
    build: Path  # the signed build v1 was published from
    running_root: Path  # the newborn's root image
    node: ImageStore  # the newborn's store
    keys: KeyDirectory  # the keys the newborn trusts


@contextlib.asynccontextmanager
async def birth_peer(tmp_path: Path, signer: str = "image-signing") -> AsyncIterator[Birth]:
    root = os.urandom(ROOT_SIZE)
    (tmp_path / "running-root").write_bytes(root)
    initrd = live_initrd(root, write_newc([Entry.file("init", b"the initrd's own", 0o755)]))
    trusted = keypair(tmp_path / "trusted")
    key = trusted if signer == "image-signing" else keypair(tmp_path / "other", signer)
    build, raw = signed_build(tmp_path / "build", "v1", key, initrd=initrd)
    peer = ImageStore(tmp_path / "peer")
    for name in ("hypervisor.vmlinuz", "hypervisor.cpio.zst"):
        peer.put_file(build / name)
    peer.add_image(raw, KeyDirectory(key.public.parent).trusted())
    boot = BootServiceConfig(births_start=ipaddress.IPv4Address("10.9.0.50"),
                             births_end=ipaddress.IPv4Address("10.9.0.59"))  # fmt: skip
    netboot = Netboot("br0", boot, tmp_path / "state", peer, lambda: "v1")
    await asyncio.to_thread(netboot.refresh)
    server = BootHttpServer(BootHttpConfig(netboot.root, None), "127.0.0.1", 0)
    await server.start()
    try:
        yield Birth(f"http://127.0.0.1:{server.port}", netboot.root / "hypervisor" / "v1",
                    build, tmp_path / "running-root", ImageStore(tmp_path / "node"),
                    KeyDirectory(trusted.public.parent))  # fmt: skip
    finally:
        await server.stop()


async def adopt(birth: Birth, version: str = "v1", root: Path | None = None) -> Adopted | None:
    return await asyncio.to_thread(adopt_booted_image, birth.node, birth.keys, version,
                                   birth.origin, root or birth.running_root,
                                   threading.Event())  # fmt: skip


async def test_a_newborn_takes_its_image_without_downloading_its_root(tmp_path: Path) -> None:
    async with birth_peer(tmp_path) as birth:
        # the export carries the signed manifest, public as the artefacts beside it
        assert (birth.export / SIGNED_NAME).read_bytes() == (
            birth.build / "manifest.signed.json"
        ).read_bytes()
        adopted = await adopt(birth)
        assert adopted is not None
        initrd = (birth.build / "hypervisor.cpio.zst").read_bytes()
        kernel = (birth.build / "hypervisor.vmlinuz").read_bytes()
        assert adopted.from_running_root == ROOT_SIZE
        # the kernel, and of the initrd its first bytes (where the root image lies) and
        # what follows the root image
        where = root_image_range(io.BytesIO(initrd))
        assert where is not None and where[1] == ROOT_SIZE
        assert adopted.downloaded == len(kernel) + PROBE + len(initrd) - sum(where)
        assert birth.node.versions() == ["v1"]
        for content in (initrd, kernel):
            with birth.node.open_object(hashlib.sha256(content).hexdigest()) as f:
                assert f.read() == content
        assert await adopt(birth) is None  # already held: nothing asked of the peer


async def test_another_root_image_means_the_initrd_comes_whole(tmp_path: Path) -> None:
    async with birth_peer(tmp_path) as birth:
        other = tmp_path / "other-root"
        other.write_bytes(os.urandom(ROOT_SIZE))  # same size, another image
        adopted = await adopt(birth, root=other)
        assert adopted is not None and adopted.from_running_root == 0
        assert birth.node.versions() == ["v1"]


async def test_a_manifest_the_node_does_not_trust_is_refused_before_any_object(
    tmp_path: Path,
) -> None:
    async with birth_peer(tmp_path, signer="stranger") as birth:
        with pytest.raises(VerificationError):
            await adopt(birth)
        assert birth.node.versions() == [] and birth.node.objects() == set()


async def test_bytes_that_do_not_hash_are_not_stored(tmp_path: Path) -> None:
    async with birth_peer(tmp_path) as birth:
        served = birth.export / "vmlinuz"
        tampered = bytearray(served.read_bytes())
        tampered[-1] ^= 1
        served.unlink()  # a link to the peer's own object: replaced, not written through
        served.write_bytes(tampered)
        with pytest.raises(CorruptObject):
            await adopt(birth)
        assert birth.node.versions() == []
        kernel = (birth.build / "hypervisor.vmlinuz").read_bytes()
        assert hashlib.sha256(kernel).hexdigest() not in birth.node.objects()


async def test_a_version_the_peer_does_not_export_ends_at_once(tmp_path: Path) -> None:
    """The node runs v2, the peer serves v1 only: a 404 is an answer, not tried again."""

    async with birth_peer(tmp_path) as birth:
        stop, tries = threading.Event(), []

        def adopt() -> Adopted | None:
            tries.append(1)
            return adopt_booted_image(birth.node, birth.keys, "v2", birth.origin,
                                      birth.running_root, stop)  # fmt: skip

        assert await asyncio.to_thread(adopt_with_retries, adopt, stop) is None
        assert len(tries) == 1  # asked once: not again after a pause
        assert birth.node.versions() == []


async def test_a_peer_that_does_not_answer_is_asked_again(tmp_path: Path) -> None:
    """A refused connection is no answer: asked ``attempts`` times (no pause here)."""
    async with birth_peer(tmp_path) as birth:
        pass  # the peer's port, closed from here on
    stop, tries = threading.Event(), []

    def adopt() -> Adopted | None:
        tries.append(1)
        return adopt_booted_image(birth.node, birth.keys, "v1", birth.origin,
                                  birth.running_root, stop)  # fmt: skip

    assert await asyncio.to_thread(adopt_with_retries, adopt, stop, 3, 0.0) is None
    assert len(tries) == 3
    assert birth.node.versions() == []


async def test_a_peer_that_answers_other_bytes_than_asked_is_refused(tmp_path: Path) -> None:
    """A hostile boot network: the manifest is real (copied from a real export), but the
    initrd's Range answers are a whole 200 body, or another range."""

    async with birth_peer(tmp_path) as birth:
        manifest = (birth.export / SIGNED_NAME).read_bytes()
        initrd = (birth.export / "initrd").read_bytes()
        kernel = (birth.export / "vmlinuz").read_bytes()
        for lie in ("whole", "shifted"):

            async def serve(request: web.Request, lie: str = lie) -> web.StreamResponse:
                name = request.match_info["name"]
                if name == SIGNED_NAME:
                    return web.Response(body=manifest)
                if name == "vmlinuz":
                    return web.Response(body=kernel)
                if lie == "whole" or "Range" not in request.headers:
                    return web.Response(body=initrd)
                first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
                start, end = int(first) + 1, int(last) + 1  # one byte off
                return web.Response(status=206, body=initrd[start : end + 1],
                                    headers={"Content-Range":
                                             f"bytes {start}-{end}/{len(initrd)}"})  # fmt: skip

            app = web.Application()
            app.router.add_get("/artefacts/hypervisor/v1/{name}", serve)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            node = ImageStore(tmp_path / f"node-{lie}")
            try:
                with pytest.raises(BootedImageError, match="no answer for bytes 0-"):
                    await asyncio.to_thread(adopt_booted_image, node, birth.keys, "v1",
                                            f"http://127.0.0.1:{port}", birth.running_root,
                                            threading.Event())  # fmt: skip
            finally:
                await runner.cleanup()
            assert node.versions() == []


def test_the_birth_peer_is_the_origin_of_the_seed_url_never_its_token(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    for line, origin in (
        ("console=ttyS0 hatchery.seed=http://10.0.0.11:8080/seed/SECRET quiet",
         "http://10.0.0.11:8080"),
        ("hatchery.seed=http://[fd00::1]:8080/seed/SECRET", "http://[fd00::1]:8080"),
        ("hatchery.seed=https://10.0.0.11:8443/seed/SECRET", None),  # no CA for its cert
        ("console=ttyS0", None),
        ("hatchery.seed=file:///etc/passwd", None),
        ("hatchery.seed=http://user:pw@10.0.0.11:8080/seed/SECRET", None),
    ):  # fmt: skip
        cmdline.write_text(line + "\n")
        assert birth_origin(cmdline) == origin, line
    assert birth_origin(tmp_path / "missing") is None


async def test_an_agent_that_stops_gives_up_between_pieces(tmp_path: Path) -> None:
    async with birth_peer(tmp_path) as birth:
        stop = threading.Event()
        stop.set()
        with pytest.raises(BootedImageError, match="stopping"):
            await asyncio.to_thread(adopt_booted_image, birth.node, birth.keys, "v1",
                                    birth.origin, birth.running_root, stop)  # fmt: skip
        assert birth.node.versions() == [] and birth.node.objects() == set()
