"""Publishing the image a node runs: the client leaves the root image out of the initrd and
the node puts its own back (``images.running_root``). The store still takes only what hashes
to the object's name; anything this node cannot complete is a 409 and the client sends the
object whole. The node's root image is a file here; on a node it is a loop device (the
demo publishes v1 into nodes running v1 this way)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from hatchery.images.running_root import running_root_device, write_with_root
from hatchery.images.store import CHUNK, ImageStore
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
        for initrd, why in ((other, "running root image inserted"), (bigger, "bytes, not")):
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
