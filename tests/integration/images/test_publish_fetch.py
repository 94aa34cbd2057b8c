"""Issue 7, image store: publish to one agent, fetch into another over mutual TLS on loopback.

Tampered objects and manifests, wrong signatures and unknown keys are refused before the
store's images change; a fetch cut half-way resumes with a Range request and verifies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from aiohttp import web
from aiohttp.typedefs import Middleware

from hatchery.client import ApiError
from hatchery.images import rawframe
from hatchery.images.fetch import RAW_TYPE, ZSTD_TYPE, FetchError, ImageFetcher
from hatchery.images.manifest import Role, parse_signed
from hatchery.images.signing import (
    KeyDirectory,
    generate_key,
    load_private_key,
    sign,
    sign_build_dir,
)
from hatchery.images.store import ImageStore
from hatchery.pki import client_context
from hatchery_lab.agent import free_port
from hatchery_lab.cpio_writer import Entry, write_newc
from hatchery_lab.synthetic_images import make_build
from tests.integration.images.conftest import Cluster, Node
from tests.support.synthetic_images import signed_build
from tests.support.upgrade_roots import live_initrd

HATCHERY = Path(sys.executable).parent / "hatchery"
INITRD = 3 * 1024 * 1024
CUT = 1024 * 1024


async def publish(node: Node, build: Path, raw: bytes) -> Any:
    async with node.client() as client:
        for name in ("hypervisor.vmlinuz", "hypervisor.cpio.zst"):
            data = (build / name).read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            await client.request("PUT", f"/v1/objects/{sha}", data=data)
        return await client.request("POST", "/v1/images", data=raw)


async def fetch(node: Node, peer: Node, version: str) -> Any:
    async with node.client() as client:
        return await client.request(
            "POST", "/v1/images/fetch", json={"peer": peer.address, "version": version}
        )


async def cli(cluster: Cluster, node: Node, *args: str) -> str:
    admin = cluster.pki.client("admin", "admin")
    proc = await asyncio.create_subprocess_exec(
        str(HATCHERY), "image", *args, "--agent", node.address, "--ca", str(cluster.pki.ca),
        "--cert", str(admin.cert), "--key", str(admin.key),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"hatchery image {' '.join(args)}: {err.decode()}{out.decode()}"
    return out.decode()


async def published(cluster: Cluster, version: str, a: Node, *peers: Node) -> tuple[Path, bytes]:
    """``version`` built (a 3 MiB initrd), signed and published to ``a``; ``a`` and ``peers``
    trust its key. The build's folder and its signed manifest."""
    for node in (a, *peers):
        node.trust(cluster.key)
    build, raw = signed_build(cluster.tmp / "builds", version, cluster.key, initrd_size=INITRD)
    await publish(a, build, raw)
    return build, raw


def same_files(store: ImageStore, version: str, build: Path, out: Path) -> None:
    exported = store.export(version, out)
    assert set(exported) == {Role.KERNEL, Role.INITRD}
    for path in exported.values():
        assert path.read_bytes() == (build / path.name).read_bytes()


def object_gets(node: Node) -> list[str | None]:
    return [rng for method, path, rng in node.seen if method == "GET" and "/objects/" in path]


async def test_the_image_a_node_says_it_runs_is_sent_whole_where_it_has_no_live_root(
    cluster: Cluster,
) -> None:
    """The CLI first offers a live initrd without its root image to a node that says it runs
    that version; the agent, which did not boot a live root, refuses (409, nothing kept) and
    the CLI sends the object whole. The cluster's agents serve the image routes only: the
    node's ``/healthz`` answer (its version, all the CLI reads of it) is the test's."""

    @web.middleware
    async def runs_dev(
        request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.json_response({"version": "dev", "checks": {"agent": "ok"}})
        return await handler(request)

    a = await cluster.node("node-a", runs_dev)
    a.trust(cluster.key)
    initrd = live_initrd(os.urandom(INITRD), write_newc([Entry.directory("bin")]))
    build, _ = signed_build(cluster.tmp / "builds", "dev", cluster.key, initrd=initrd)
    answer = json.loads(await cli(cluster, a, "publish", str(build), "--json"))
    assert answer["from_running_root"] == []
    assert sorted(answer["uploaded"]) == ["hypervisor.cpio.zst", "hypervisor.vmlinuz"]
    to_initrd = f"/v1/objects/{hashlib.sha256(initrd).hexdigest()}"
    puts = [path for method, path, _ in a.seen if method == "PUT" and path == to_initrd]
    assert len(puts) == 2  # offered around the root image first and refused, then whole
    assert a.store.versions() == ["dev"]
    same_files(a.store, "dev", build, cluster.tmp / "boot")


async def test_publish_list_and_fetch_with_the_cli(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    a.trust(cluster.key)
    b.trust(cluster.key)
    build, _ = signed_build(cluster.tmp / "builds", "1.0", cluster.key, initrd_size=INITRD)

    out = await cli(cluster, a, "publish", str(build))
    assert "published hypervisor 1.0" in out and "hypervisor.cpio.zst" in out
    again = json.loads(await cli(cluster, a, "publish", str(build), "--json"))
    assert again["uploaded"] == [] and len(again["already_there"]) == 2
    listing = json.loads(await cli(cluster, a, "list", "--json"))
    assert [i["version"] for i in listing["images"]] == ["1.0"]
    assert listing["current"] is None

    fetched = json.loads(await cli(cluster, b, "fetch", "--peer", a.address, "1.0", "--json"))
    assert fetched["fetched_objects"] == 2 and fetched["added"] is True
    assert b.store.versions() == ["1.0"]
    same_files(b.store, "1.0", build, cluster.tmp / "boot")
    assert "1.0" in await cli(cluster, b, "list")

    # A second fetch has nothing to download.
    second = await fetch(b, a, "1.0")
    assert second["fetched_objects"] == 0 and second["present_objects"] == 2


async def test_permissions(cluster: Cluster) -> None:
    a = await cluster.node("node-a")
    a.trust(cluster.key)
    build, raw = signed_build(cluster.tmp / "builds", "1.0", cluster.key)
    await publish(a, build, raw)
    sha = parse_signed(raw).manifest.artefacts[Role.KERNEL].sha256
    async with a.client("viewer", "reader") as reader:
        listing = await reader.request("GET", "/v1/images")
        assert [i["version"] for i in listing["images"]] == ["1.0"]
        assert (await reader.request("GET", "/v1/images/1.0"))["manifest"]["version"] == "1.0"
        for method, path, body in (
            ("PUT", f"/v1/objects/{'0' * 64}", b"x"),
            ("POST", "/v1/images", raw),
            ("POST", "/v1/images/fetch", b'{"peer": "127.0.0.1:1", "version": "1.0"}'),
        ):
            with pytest.raises(ApiError) as err:
                await reader.request(method, path, data=body)
            assert err.value.status == 403 and "may not images.manage" in err.value.message
    async with a.client("nobody", "nogroup") as nobody:
        with pytest.raises(ApiError) as err:
            await nobody.request("GET", f"/v1/objects/{sha}")
        assert err.value.status == 403
    assert a.store.objects() == parse_signed(raw).manifest.objects()


async def test_publishing_refuses_what_does_not_verify(cluster: Cluster) -> None:
    a = await cluster.node("node-a")
    a.trust(cluster.key)
    build, raw = signed_build(cluster.tmp / "builds", "1.0", cluster.key)
    async with a.client() as admin:
        with pytest.raises(ApiError) as err:
            await admin.request("POST", "/v1/images", data=raw)
        assert err.value.status == 409 and "missing" in err.value.message
        with pytest.raises(ApiError) as err:
            await admin.request("PUT", f"/v1/objects/{'0' * 64}", data=b"not that content")
        assert err.value.status == 422
        with pytest.raises(ApiError) as err:
            await admin.request("PUT", "/v1/objects/nothex", data=b"x")
        assert err.value.status == 400
        with pytest.raises(ApiError) as err:
            await admin.request("POST", "/v1/images", data=b"{not json")
        assert err.value.status == 400
        with pytest.raises(ApiError) as err:
            await admin.request("GET", "/v1/images/..%2Fetc")
        assert err.value.status in (400, 404)
    assert a.store.objects() == set()
    await publish(a, build, raw)
    other = generate_key(cluster.tmp / "other")
    for doc in (
        raw.replace(b'"systemd": "252.36-1"', b'"systemd": "252.36-2"'),
        sign(parse_signed(raw).manifest, load_private_key(other.private)).to_bytes(),
    ):
        bad = doc.replace(b'"1.0"', b'"1.1"')
        with pytest.raises(ApiError) as err:
            async with a.client() as admin:
                await admin.request("POST", "/v1/images", data=bad)
        assert err.value.status == 422
    assert a.store.versions() == ["1.0"]


def _tamper_object(a: Node, raw: bytes) -> None:
    sha = parse_signed(raw).manifest.artefacts[Role.INITRD].sha256
    evil = zstandard.ZstdCompressor().compress(b"evil" * 1000)
    a.store.object_path(sha).write_bytes(evil)


def _tamper_manifest(a: Node, raw: bytes) -> None:
    path = a.store.root / "images" / "1.0.json"
    path.write_bytes(path.read_bytes().replace(b'"252.36-1"', b'"252.36-9"'))


def _wrong_signature(a: Node, raw: bytes, cluster: Cluster) -> None:
    other = generate_key(cluster.tmp / "other")
    forged = sign(parse_signed(raw).manifest, load_private_key(other.private))
    doc = json.loads(forged.to_bytes())
    doc["signature"]["key"] = cluster.key.key_id  # claims the trusted key
    (a.store.root / "images" / "1.0.json").write_text(json.dumps(doc))


def _unknown_key(a: Node, raw: bytes, cluster: Cluster) -> None:
    other = generate_key(cluster.tmp / "other")
    resigned = sign(parse_signed(raw).manifest, load_private_key(other.private))
    (a.store.root / "images" / "1.0.json").write_bytes(resigned.to_bytes())


@pytest.mark.parametrize(
    ("case", "message", "downloads_objects"),
    [
        ("tampered object", "refused", True),
        ("tampered manifest", "does not match the manifest", False),
        ("wrong signature", "does not match the manifest", False),
        ("unknown key", "does not trust", False),
        ("malformed manifest", "malformed manifest", False),
    ],
)
async def test_fetch_refuses_before_any_change(
    cluster: Cluster, case: str, message: str, downloads_objects: bool
) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    build, raw = await published(cluster, "1.0", a, b)
    if case == "tampered object":
        _tamper_object(a, raw)
    elif case == "tampered manifest":
        _tamper_manifest(a, raw)
    elif case == "wrong signature":
        _wrong_signature(a, raw, cluster)
    elif case == "malformed manifest":
        (a.store.root / "images" / "1.0.json").write_bytes(raw.replace(b'"format": 1', b'"f": 1'))
    else:
        _unknown_key(a, raw, cluster)
    with pytest.raises(ApiError) as err:
        await fetch(b, a, "1.0")
    assert err.value.status == 422 and message in err.value.message
    assert b.store.versions() == []
    initrd = parse_signed(raw).manifest.artefacts[Role.INITRD].sha256
    assert not b.store.has_object(initrd)
    assert list((b.store.root / "partial").iterdir()) == []
    assert bool(object_gets(a)) == downloads_objects
    # Once the peer serves the genuine image again, the same fetch succeeds.
    (a.store.root / "images" / "1.0.json").write_bytes(raw)
    for name in ("hypervisor.vmlinuz", "hypervisor.cpio.zst"):
        a.store.put_file(build / name)
    assert (await fetch(b, a, "1.0"))["added"] is True
    same_files(b.store, "1.0", build, cluster.tmp / "boot")


async def _first_bytes(store: ImageStore, request: web.Request) -> web.StreamResponse:
    """Start answering with the stored object as the real route would (its length and
    form), but send only its first CUT bytes."""
    path = store.object_path(request.match_info["sha256"])
    data = path.read_bytes()
    kind = RAW_TYPE if path.suffix == ".raw" else ZSTD_TYPE
    resp = web.StreamResponse(headers={"Content-Length": str(len(data)), "Content-Type": kind})
    await resp.prepare(request)
    await resp.write(data[:CUT])
    return resp


def cutter(store: Callable[[], ImageStore], times: int) -> Middleware:
    """Serve the first ``times`` object downloads only up to CUT bytes, then drop the line."""
    left = [times]

    @web.middleware
    async def cut(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method != "GET" or not request.path.startswith("/v1/objects/") or left[0] <= 0:
            return await handler(request)
        left[0] -= 1
        resp = await _first_bytes(store(), request)
        assert request.transport is not None
        request.transport.close()
        return resp

    return cut


async def test_a_cut_fetch_resumes_from_its_partial_file(cluster: Cluster) -> None:
    holder: list[Node] = []
    a = await cluster.node("node-a", cutter(lambda: holder[0].store, times=1))
    holder.append(a)
    b = await cluster.node("node-b")
    build, raw = await published(cluster, "1.0", a, b)
    initrd = parse_signed(raw).manifest.artefacts[Role.INITRD].sha256

    tls = client_context(cluster.pki.ca, b.client_pair.cert, b.client_pair.key)
    once = ImageFetcher(b.store, KeyDirectory(b.keys_dir), tls, attempts=1)
    with pytest.raises(FetchError, match="cannot download") as err:
        await once.fetch(a.address, "1.0")
    assert err.value.hint is not None and "resumes" in err.value.hint
    partial = b.store.partial_path(initrd, a.store.raw_path(initrd) is not None)
    kept = partial.stat().st_size
    assert 0 < kept <= CUT
    assert b.store.versions() == [] and not b.store.has_object(initrd)

    report = await once.fetch(a.address, "1.0")
    assert report.added and report.resumed_bytes == kept
    assert f"bytes={kept}-" in object_gets(a)
    assert not partial.exists()
    same_files(b.store, "1.0", build, cluster.tmp / "boot")


async def test_one_fetch_survives_a_cut_by_resuming(cluster: Cluster) -> None:
    holder: list[Node] = []
    a = await cluster.node("node-a", cutter(lambda: holder[0].store, times=1))
    holder.append(a)
    b = await cluster.node("node-b")
    build, raw = await published(cluster, "2.0", a, b)
    report = await fetch(b, a, "2.0")
    assert report["added"] and 0 < report["resumed_bytes"] <= CUT
    assert any(rng and rng.startswith("bytes=") for rng in object_gets(a))
    same_files(b.store, "2.0", build, cluster.tmp / "boot")


async def test_a_resumed_download_that_does_not_verify_is_discarded(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    build, raw = await published(cluster, "1.0", a, b)
    initrd = parse_signed(raw).manifest.artefacts[Role.INITRD].sha256
    as_is = a.store.raw_path(initrd) is not None  # the form the peer sends it in
    b.store.partial_path(initrd, as_is).write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 1000)
    with pytest.raises(ApiError) as err:
        await fetch(b, a, "1.0")
    assert err.value.status == 422
    assert not b.store.partial_path(initrd, as_is).exists() and b.store.versions() == []
    assert (await fetch(b, a, "1.0"))["added"] is True
    same_files(b.store, "1.0", build, cluster.tmp / "boot")


def staller(store: Callable[[], ImageStore], release: asyncio.Event) -> Middleware:
    """Serve the first object download up to CUT bytes, then hang until ``release``."""
    left = [1]

    @web.middleware
    async def stall(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method != "GET" or not request.path.startswith("/v1/objects/") or left[0] <= 0:
            return await handler(request)
        left[0] -= 1
        resp = await _first_bytes(store(), request)
        await release.wait()
        assert request.transport is not None
        request.transport.close()
        return resp

    return stall


async def test_a_cancelled_fetch_keeps_its_partial_file_and_resumes(cluster: Cluster) -> None:
    release = asyncio.Event()
    holder: list[Node] = []
    a = await cluster.node("node-a", staller(lambda: holder[0].store, release))
    holder.append(a)
    b = await cluster.node("node-b")
    build, raw = await published(cluster, "1.0", a, b)
    initrd = parse_signed(raw).manifest.artefacts[Role.INITRD].sha256
    partial = b.store.partial_path(initrd, a.store.raw_path(initrd) is not None)

    tls = client_context(cluster.pki.ca, b.client_pair.cert, b.client_pair.key)
    fetcher = ImageFetcher(b.store, KeyDirectory(b.keys_dir), tls)
    task = asyncio.create_task(fetcher.fetch(a.address, "1.0"), name="fetch-to-cancel")
    try:
        # Wait (generously) until the first CUT bytes have landed, then kill the fetch.
        for _ in range(600):
            if partial.exists() and partial.stat().st_size >= CUT:
                break
            await asyncio.sleep(0.05)
        assert partial.stat().st_size == CUT
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()
    assert partial.stat().st_size == CUT and b.store.versions() == []
    report = await fetcher.fetch(a.address, "1.0")
    assert report.added and report.resumed_bytes == CUT
    same_files(b.store, "1.0", build, cluster.tmp / "boot")


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b"[]",
        b'{"peer": "127.0.0.1:1"}',
        b'{"peer": "127.0.0.1:1", "version": "../x"}',
        b'{"peer": "evil/path", "version": "1"}',
        b'{"peer": 5, "version": "1"}',
        b'{"peer": "127.0.0.1:1", "version": "1", "more": 1}',
        b"\xff",
    ],
)
async def test_bad_fetch_requests_are_a_400(cluster: Cluster, body: bytes) -> None:
    b = await cluster.node("node-b")
    async with b.client() as admin:
        with pytest.raises(ApiError) as err:
            await admin.request("POST", "/v1/images/fetch", data=body)
    assert err.value.status == 400
    assert list((b.store.root / "partial").iterdir()) == []


async def test_a_peer_without_the_image_or_unreachable_is_a_502(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    with pytest.raises(ApiError) as err:
        await fetch(b, a, "9.9")
    assert err.value.status == 502 and "has no image 9.9" in err.value.message
    async with b.client() as admin:
        with pytest.raises(ApiError) as err:
            body = {"peer": f"127.0.0.1:{free_port()}", "version": "1"}
            await admin.request("POST", "/v1/images/fetch", json=body)
    assert err.value.status == 502 and "cannot get the manifest" in err.value.message


def _curl(node: Node, cluster: Cluster, sha: str, *extra: str) -> tuple[bytes, str]:
    """An object as curl gets it from ``node`` (mutual TLS), and its Content-Type."""
    pair = cluster.pki.client("reader", "admin")
    out = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(cluster.pki.ca), "--cert", str(pair.cert),
         "--key", str(pair.key), "-o", "-", "-w", "%{stderr}%{content_type}", *extra,
         f"https://{node.address}/v1/objects/{sha}"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return out.stdout, out.stderr.decode()


async def test_an_object_kept_as_is_is_served_to_old_and_new_peers(cluster: Cluster) -> None:
    """Already-compressed content is stored as is. A peer that says it takes that gets the
    content itself; an older one, which asks for zstd only, gets a zstd file framing it in
    raw blocks: the real zstd tool decodes it, and any byte range of it (where an old agent
    resumes a cut download) is the same bytes as the whole file's."""
    a = await cluster.node("node-a")
    build, raw = await published(cluster, "1.0", a)
    initrd = parse_signed(raw).manifest.artefacts[Role.INITRD]
    content = (build / "hypervisor.cpio.zst").read_bytes()
    assert a.store.raw_path(initrd.sha256) is not None
    assert a.store.usage() < INITRD + 1024 * 1024  # no second copy, no zstd framing stored

    body, kind = await asyncio.to_thread(_curl, a, cluster, initrd.sha256,
                                         "-H", "Accept: application/octet-stream")  # fmt: skip
    assert kind == "application/octet-stream" and body == content

    whole, kind = await asyncio.to_thread(_curl, a, cluster, initrd.sha256)
    assert kind == "application/zstd" and len(whole) == rawframe.framed_size(len(content))
    plain = subprocess.run(["zstd", "-dc"], input=whole, capture_output=True, check=True)
    assert plain.stdout == content
    for start in (0, 5, 14, 17, 131091, 131092, len(whole) - 3, len(whole) - 1):
        part, _ = await asyncio.to_thread(_curl, a, cluster, initrd.sha256, "-r", f"{start}-")
        assert part == whole[start:], start
    part, _ = await asyncio.to_thread(_curl, a, cluster, initrd.sha256, "-r", "100-300000")
    assert part == whole[100:300001]
    part, _ = await asyncio.to_thread(_curl, a, cluster, initrd.sha256, "-r", "-1000")
    assert part == whole[-1000:]
    with pytest.raises(subprocess.CalledProcessError) as beyond:
        await asyncio.to_thread(_curl, a, cluster, initrd.sha256, "-r", f"{len(whole)}-")
    assert "416" in beyond.value.stderr.decode()


async def test_a_part_of_the_other_form_is_dropped_and_the_fetch_starts_afresh(
    cluster: Cluster,
) -> None:
    """A partial download left from a peer that sent zstd, resumed from one that sends the
    content as is: the part is useless, so it goes and the object is fetched whole."""
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    build, raw = await published(cluster, "1.0", a, b)
    initrd = parse_signed(raw).manifest.artefacts[Role.INITRD].sha256
    content = (build / "hypervisor.cpio.zst").read_bytes()
    framed = b"".join(
        p if isinstance(p, bytes) else content[p.offset : p.offset + p.count]
        for p in rawframe.pieces(len(content), 0, rawframe.framed_size(len(content)))
    )
    b.store.partial_path(initrd).write_bytes(framed[:CUT])  # as an older peer sent it
    report = await fetch(b, a, "1.0")
    assert report["added"] and report["resumed_bytes"] == 0
    assert b.store.raw_path(initrd) is not None
    assert list((b.store.root / "partial").iterdir()) == []
    same_files(b.store, "1.0", build, cluster.tmp / "boot")


async def test_several_builds_in_one_publish_send_a_shared_object_once(cluster: Cluster) -> None:
    """``hatchery image publish V1 V2``: both go at once; the kernel both name goes up once
    (the other build waits for it), and each manifest follows its own objects."""
    a = await cluster.node("node-a")
    a.trust(cluster.key)
    kernel = os.urandom(64 * 1024)
    builds = []
    for version in ("2.0", "2.1"):
        build = make_build(cluster.tmp / "builds", version, kernel=kernel, initrd_size=INITRD)
        sign_build_dir(build, cluster.key.private)
        builds.append(build)
    answers = json.loads(await cli(cluster, a, "publish", *map(str, builds), "--json"))
    assert [answer["version"] for answer in answers] == ["2.0", "2.1"]
    for answer in answers:
        assert "hypervisor.vmlinuz" in answer["uploaded"] + answer["already_there"], answer
        assert answer["uploaded"].count("hypervisor.cpio.zst") == 1, answer
    to_kernel = f"/v1/objects/{hashlib.sha256(kernel).hexdigest()}"
    assert [m for m, path, _ in a.seen if path == to_kernel].count("PUT") == 1
    assert sorted(a.store.versions()) == ["2.0", "2.1"]
    one = json.loads(await cli(cluster, a, "publish", str(builds[0]), "--json"))
    assert one["version"] == "2.0"  # one build: its own answer, as before
    assert sorted(one["already_there"]) == ["hypervisor.cpio.zst", "hypervisor.vmlinuz"]
