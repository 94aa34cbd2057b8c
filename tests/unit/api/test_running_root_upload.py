"""Publishing the image a node runs: the client leaves the root image out of the initrd and
the node puts its own back (``images.running_root``); and the next one: the client sends a
zstd patch against that root image (made by the real ``zstd --patch-from``) and the node
decodes it. The store still takes only what hashes to the object's name; anything this node
cannot complete is a 409 and the client sends the object whole. The node's root image is a
file here; on a node it is a loop device (the demo publishes v1 into nodes running v1, and
v2 as a patch, this way)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from hatchery.cli.image import _patch_on_root
from hatchery.images.running_root import (
    MAX_PATCH_WINDOW,
    NotRunningRoot,
    running_root_device,
    write_patched,
    write_with_root,
)
from hatchery.images.store import CHUNK, CorruptObject, ImageStore
from hatchery.upgrade.archive import root_image_range
from hatchery_lab.cpio_writer import Entry, write_newc
from tests.support.upgrade_roots import live_initrd
from tests.unit.api.conftest import ADMIN, READER, serving


def _live_initrd(root: bytes) -> bytes:
    return live_initrd(root, write_newc([Entry.file("init", b"the initrd's own", 0o755)]))


def _around(initrd: bytes) -> tuple[bytes, int, int]:
    where = root_image_range(io.BytesIO(initrd))
    assert where is not None
    offset, size = where
    return initrd[:offset] + initrd[offset + size :], offset, size


@pytest.fixture
def root_image(tmp_path: Path) -> Path:
    path = tmp_path / "running-root"
    path.write_bytes(os.urandom(3 * CHUNK + 12345))  # several pieces, not aligned
    return path


async def test_the_node_puts_its_running_root_back(tmp_path: Path, root_image: Path) -> None:
    initrd = _live_initrd(root_image.read_bytes())
    sha = hashlib.sha256(initrd).hexdigest()
    rest, offset, size = _around(initrd)
    async with serving(tmp_path, running_root=lambda: root_image) as api:
        query = f"running_root_at={offset}&running_root_size={size}"
        put = await api.client.put(f"/v1/objects/{sha}?{query}", data=rest, headers=ADMIN)
        assert put.status == 201, await put.text()
        assert await put.json() == {"sha256": sha, "size": len(initrd), "from_running_root": size}
        got = await api.client.get(f"/v1/objects/{sha}", headers={**READER,
                                   "Accept": "application/octet-stream"})  # fmt: skip
        assert got.status == 200
        assert sha in api.store.objects()
        with api.store.open_object(sha) as f:  # the very content, stored as a whole upload is
            assert f.read() == initrd


async def test_what_the_node_cannot_complete_is_refused_and_nothing_stored(
    tmp_path: Path, root_image: Path
) -> None:
    ours = _live_initrd(root_image.read_bytes())
    other = _live_initrd(os.urandom(root_image.stat().st_size))  # another image, same size
    bigger = _live_initrd(os.urandom(root_image.stat().st_size + 4))
    async with serving(tmp_path, running_root=lambda: root_image) as api:
        for initrd, why in ((other, "with this node's running root image"), (bigger, "bytes, not")):
            sha = hashlib.sha256(initrd).hexdigest()
            rest, offset, size = _around(initrd)
            query = f"running_root_at={offset}&running_root_size={size}"
            put = await api.client.put(f"/v1/objects/{sha}?{query}", data=rest, headers=ADMIN)
            assert put.status == 409, why
            answer = await put.json()
            assert why in answer["error"] and answer["hint"] == "upload the object whole"
        sha = hashlib.sha256(ours).hexdigest()
        rest, offset, size = _around(ours)
        for query, field in (
            (f"running_root_at=-1&running_root_size={size}", "running_root_at"),
            (f"running_root_at={offset}&running_root_size=x", "running_root_size"),
            (f"running_root_at={len(rest) + 1}&running_root_size={size}", "running_root_at"),
        ):
            put = await api.client.put(f"/v1/objects/{sha}?{query}", data=rest, headers=ADMIN)
            assert put.status == 400 and (await put.json())["field"] == field, query
        query = f"running_root_at={offset}&running_root_size={size}"
        refused = await api.client.put(f"/v1/objects/{sha}?{query}", data=rest, headers=READER)
        assert refused.status == 403  # a request body never grants a permission
        assert api.store.objects() == set()


async def test_a_node_without_a_live_root_refuses(tmp_path: Path, root_image: Path) -> None:
    initrd = _live_initrd(root_image.read_bytes())
    rest, offset, size = _around(initrd)
    sha = hashlib.sha256(initrd).hexdigest()
    async with serving(tmp_path) as api:
        query = f"running_root_at={offset}&running_root_size={size}"
        put = await api.client.put(f"/v1/objects/{sha}?{query}", data=rest, headers=ADMIN)
        assert put.status == 409
        assert "did not boot from a live root image" in (await put.json())["error"]


def test_the_store_decides_compression_as_for_the_whole_upload(
    tmp_path: Path, root_image: Path
) -> None:
    """The first piece written is a whole 1 MiB, as an upload's: the same stored form."""
    initrd = _live_initrd(root_image.read_bytes())
    rest, offset, size = _around(initrd)
    around, whole = ImageStore(tmp_path / "a"), ImageStore(tmp_path / "b")
    with around.writer() as writer:
        write_with_root(writer, rest, offset, root_image, size)
        sha = writer.commit()
    assert whole.put(initrd[i : i + CHUNK] for i in range(0, len(initrd), CHUNK)) == sha
    assert around.object_path(sha).name == whole.object_path(sha).name


def test_only_a_live_initrd_has_a_root_range() -> None:
    assert root_image_range(io.BytesIO(b"\x28\xb5\x2f\xfd compressed")) is None
    assert root_image_range(io.BytesIO(write_newc([Entry.directory("etc")]))) is None
    assert root_image_range(io.BytesIO(b"not a cpio at all")) is None
    initrd = _live_initrd(b"hsqs" + bytes(100))
    offset, size = root_image_range(io.BytesIO(initrd)) or (0, 0)
    assert initrd[offset : offset + size] == b"hsqs" + bytes(100)


def test_the_running_root_is_the_squashfs_loop_device_mounted_at_its_place(
    tmp_path: Path,
) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/run/hatchery/root\n"
        "30 22 7:0 / /run/hatchery/root ro,relatime shared:2 - squashfs /dev/loop0 ro\n"
        "31 22 7:1 / /run/hatchery/rootx ro shared:3 - squashfs /dev/loop1 ro\n"
    )
    assert running_root_device(mountinfo) == Path("/dev/loop0")
    mountinfo.write_text("30 22 0:5 / /run/hatchery/root rw - tmpfs tmpfs rw\n")
    assert running_root_device(mountinfo) is None  # not a loop-mounted image
    assert running_root_device(tmp_path / "absent") is None


def _next_version(root: bytes) -> bytes:
    """A next version's live initrd: its root image is ours with a few changes."""
    changed = bytearray(root)
    changed[100:200] = os.urandom(100)
    changed[2 * CHUNK : 2 * CHUNK + 5000] = os.urandom(5000)
    return _live_initrd(bytes(changed) + b"a new file at the end")


def _patch(zstd: str, base: Path, target: bytes, tmp: Path) -> bytes:
    path = tmp / "target"
    path.write_bytes(target)
    made = subprocess.run([zstd, "-q", "-c", "-3", f"--patch-from={base}", str(path)],
                          capture_output=True, check=True)  # fmt: skip
    return made.stdout


async def test_the_next_version_comes_as_a_patch_on_the_running_root(
    tmp_path: Path, root_image: Path, require_tool: Callable[[str], str]
) -> None:
    v2 = _next_version(root_image.read_bytes())
    sha = hashlib.sha256(v2).hexdigest()
    patch = _patch(require_tool("zstd"), root_image, v2, tmp_path)
    assert len(patch) < len(v2) // 50  # what the patch is for
    size = root_image.stat().st_size
    async with serving(tmp_path, running_root=lambda: root_image) as api:
        put = await api.client.put(f"/v1/objects/{sha}?patched_on_running_root={size}",
                                   data=patch, headers=ADMIN)  # fmt: skip
        assert put.status == 201, await put.text()
        assert await put.json() == {"sha256": sha, "size": len(v2), "from_running_root": size}
        with api.store.open_object(sha) as f:
            assert f.read() == v2


async def test_a_patch_the_node_cannot_apply_is_refused_and_nothing_stored(
    tmp_path: Path, root_image: Path, require_tool: Callable[[str], str]
) -> None:
    zstd = require_tool("zstd")
    v2 = _next_version(root_image.read_bytes())
    sha = hashlib.sha256(v2).hexdigest()
    size = root_image.stat().st_size
    elsewhere = tmp_path / "another-root"  # another build of v1: same size, some bytes not
    other_v1 = bytearray(root_image.read_bytes())
    other_v1[CHUNK : 2 * CHUNK] = os.urandom(CHUNK)
    elsewhere.write_bytes(other_v1)
    other_v2 = _live_initrd(bytes(other_v1))  # its patch takes those bytes from its base
    huge_window = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters(
            window_log=MAX_PATCH_WINDOW.bit_length(),
            write_content_size=False,  # twice the bound
        ),
    ).compressobj()
    cases = [
        (_patch(zstd, elsewhere, other_v2, tmp_path), other_v2, "does not decode"),
        (b"not a zstd frame at all", v2, "does not decode"),
        (huge_window.compress(v2) + huge_window.flush(), v2, "does not decode"),  # its window
        (zstandard.ZstdCompressor().compress(b"short"), v2, "sha256"),  # another object
    ]
    async with serving(tmp_path, running_root=lambda: root_image) as api:
        for body, target, why in cases:
            digest = hashlib.sha256(target).hexdigest()
            put = await api.client.put(f"/v1/objects/{digest}?patched_on_running_root={size}",
                                       data=body, headers=ADMIN)  # fmt: skip
            assert put.status == 409, why
            answer = await put.json()
            assert why in answer["error"] and answer["hint"] == "upload the object whole", answer
        good = _patch(zstd, root_image, v2, tmp_path)
        put = await api.client.put(f"/v1/objects/{sha}?patched_on_running_root={size + 1}",
                                   data=good, headers=ADMIN)  # fmt: skip
        assert put.status == 409 and "bytes, not" in (await put.json())["error"]
        put = await api.client.put(f"/v1/objects/{sha}?patched_on_running_root=x", data=good,
                                   headers=ADMIN)  # fmt: skip
        assert put.status == 400 and (await put.json())["field"] == "patched_on_running_root"
        refused = await api.client.put(f"/v1/objects/{sha}?patched_on_running_root={size}",
                                       data=good, headers=READER)  # fmt: skip
        assert refused.status == 403  # a request body never grants a permission
        assert api.store.objects() == set()


def test_a_mangled_patch_never_stores_anything(
    tmp_path: Path, root_image: Path, require_tool: Callable[[str], str]
) -> None:
    """Fuzz: bytes of a good patch flipped, cut or repeated; each is refused as undecodable
    or as another object (the frame's checksum and the object's sha256), never stored."""
    v2 = _next_version(root_image.read_bytes())
    sha = hashlib.sha256(v2).hexdigest()
    good = _patch(require_tool("zstd"), root_image, v2, tmp_path)
    store = ImageStore(tmp_path / "store")
    size = root_image.stat().st_size
    rng = random.Random(20261205)
    for _ in range(150):
        mangled = bytearray(good)
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                mangled[rng.randrange(len(mangled))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            mangled = mangled[: rng.randrange(len(mangled))]
        else:
            at = rng.randrange(len(mangled))
            mangled = mangled[:at] + mangled[at : at + 64] + mangled[at:]
        with store.writer(sha) as writer:
            try:
                write_patched(writer, bytes(mangled), root_image, size)
                writer.commit()
            except (NotRunningRoot, CorruptObject):  # refused; anything else fails the test
                continue
            assert bytes(mangled) == good  # stored: only the good patch may get here
    assert store.objects() <= {sha}


async def test_the_clis_patch_is_one_the_node_applies(
    tmp_path: Path, root_image: Path, require_tool: Callable[[str], str]
) -> None:
    """``hatchery image publish --base``: the CLI's own patch, from two build files as it
    finds them (the base's root image cut out of its initrd), applied by the node."""
    require_tool("zstd")
    v1, v2 = tmp_path / "v1.cpio", tmp_path / "v2.cpio"
    v1.write_bytes(_live_initrd(root_image.read_bytes()))
    v2.write_bytes(_next_version(root_image.read_bytes()))
    made = await _patch_on_root(v1, v2)
    assert made is not None
    patch, size = made
    assert size == root_image.stat().st_size and len(patch) < v2.stat().st_size // 50
    store = ImageStore(tmp_path / "store")
    with store.writer(hashlib.sha256(v2.read_bytes()).hexdigest()) as writer:
        write_patched(writer, patch, root_image, size)
        writer.commit()
    mkosi_cpio = tmp_path / "cpio.zst"  # another layout: no root image to patch against
    mkosi_cpio.write_bytes(
        zstandard.ZstdCompressor().compress(write_newc([Entry.directory("etc")]))
    )
    assert await _patch_on_root(mkosi_cpio, v2) is None
