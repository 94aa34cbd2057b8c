"""Routes in-process: machine types, image requests, bodies through ``validate``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from hatchery.addresses import AddressPool
from hatchery.api import images as images_api
from hatchery.api.app import ApiContext, make_app
from hatchery.api.images import ImagesContext
from hatchery.api.policy import load_policy
from hatchery.capacity import HostCapacity
from hatchery.cli.main import main
from hatchery.health import NodeHealth
from hatchery.images.signing import KeyDirectory
from hatchery.images.store import ImageStore, ObjectWriter, content_chunks
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.qemu.cmdline import MACHINES
from hatchery.vms.manager import VmManager
from tests.unit.api.conftest import ADMIN, READER, Api, header_identity


@pytest.mark.parametrize("machine", MACHINES)
async def test_each_supported_machine_is_accepted(api: Api, machine: str) -> None:
    """...and recorded versioned, as the node's QEMU names it (issue 16): q35 → pc-q35-7.2."""
    body = {"name": machine, "kernel": {"kernel": str(api.kernel)}, "start": False,
            "machine": machine}  # fmt: skip
    resp = await api.client.post("/v1/vms", json=body, headers=ADMIN)
    versioned = {"q35": r"pc-q35-\d+\.\d+", "pc": r"pc-i440fx-\d+\.\d+"}[machine]
    assert resp.status == 201 and re.fullmatch(versioned, (await resp.json())["machine"])


@pytest.mark.parametrize("machine", ["microvm", "isapc", "pc-q35-7.2", "Q35"])
async def test_other_machines_are_refused_naming_the_supported_ones(api: Api, machine: str) -> None:
    body = {"name": "m1", "kernel": {"kernel": str(api.kernel)}, "start": False,
            "machine": machine}  # fmt: skip
    resp = await api.client.post("/v1/vms", json=body, headers=ADMIN)
    answer = await resp.json()
    assert resp.status == 400 and answer["field"] == "machine"
    assert answer["error"] == f"machine must be one of q35, pc, not {machine!r}"
    assert api.manager.records() == []


def test_the_cli_offers_the_same_machines(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["vm", "create", "v1", "--kernel", "/k", "--machine", "microvm"])
    assert exited.value.code == 2  # refused by argparse, before any request
    assert "invalid choice: 'microvm' (choose from 'q35', 'pc')" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{}", "peer"),
        (b"[]", None),
        (b'{"peer": "127.0.0.1:1"}', "version"),
        (b'{"peer": "127.0.0.1:1", "version": "../x"}', "version"),
        (b'{"peer": "evil/path", "version": "1"}', "peer"),
        (b'{"peer": "user@host", "version": "1"}', "peer"),
        (b'{"peer": 5, "version": "1"}', "peer"),
        (b'{"peer": "127.0.0.1:1", "version": "1", "more": 1}', "more"),
        (b"\xff", None),
    ],
)
async def test_bad_fetch_bodies_name_the_field(api: Api, body: bytes, field: str | None) -> None:
    resp = await api.client.post("/v1/images/fetch", data=body, headers=ADMIN)
    answer = await resp.json()
    assert resp.status == 400 and answer["field"] == field
    assert not any((api.store.root / "partial").iterdir())


async def test_fetch_bodies_have_a_small_limit(api: Api) -> None:
    body = b'{"peer": "' + b"a" * 5000 + b'", "version": "1"}'
    resp = await api.client.post("/v1/images/fetch", data=body, headers=ADMIN)
    assert resp.status == 413


async def test_fetch_without_peer_credentials_is_unavailable(tmp_path: Path) -> None:
    with AddressPool(tmp_path / "pool.db") as pool:
        manager = VmManager(tmp_path, pool, HostCapacity(1, 1, 1), AccelChoice(Accel.TCG, "t"))
        context = ApiContext(manager, pool, load_policy(None), NodeHealth("v1"), time.time())
        images = ImagesContext.build(ImageStore(tmp_path / "images"), KeyDirectory(tmp_path / "k"))
        app = make_app(context, images, identify=header_identity)
        async with TestClient(TestServer(app)) as client:
            body = {"peer": "127.0.0.1:1", "version": "1"}
            resp = await client.post("/v1/images/fetch", json=body, headers=ADMIN)
            answer = await resp.json()
    assert resp.status == 503 and "no client credentials" in answer["error"]


async def test_readers_read_images_but_do_not_write(api: Api) -> None:
    listing = await api.client.get("/v1/images", headers=READER)
    assert listing.status == 200
    assert await listing.json() == {"images": [], "current": None, "previous": None}
    for method, path in (
        ("PUT", f"/v1/objects/{'0' * 64}"),
        ("POST", "/v1/images"),
        ("POST", "/v1/images/fetch"),
    ):
        resp = await api.client.request(method, path, data=b"x", headers=READER)
        assert resp.status == 403, path
        assert "may not images.manage" in (await resp.json())["error"]
    assert api.store.objects() == set()


async def test_an_uploaded_object_is_served_as_stored(api: Api) -> None:
    data = b"kernel bytes " * 1000
    sha = hashlib.sha256(data).hexdigest()
    put = await api.client.put(f"/v1/objects/{sha}", data=data, headers=ADMIN)
    assert put.status == 201 and (await put.json()) == {"sha256": sha, "size": len(data)}
    got = await api.client.get(f"/v1/objects/{sha}", headers=READER)
    assert got.status == 200 and got.headers["Content-Type"] == "application/zstd"
    assert (await got.read())[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    wrong = await api.client.put(f"/v1/objects/{'1' * 64}", data=data, headers=ADMIN)
    assert wrong.status == 422


async def _pieces(data: bytes, size: int, cut_at: int | None = None) -> AsyncIterator[bytes]:
    """``data`` in ``size``-byte pieces, as a network delivers it; with ``cut_at``, the
    sender fails there."""
    for start in range(0, len(data), size):
        if cut_at is not None and start >= cut_at:
            raise ConnectionResetError("the uploader went away")
        yield data[start : start + size]
        await asyncio.sleep(0)


@pytest.mark.parametrize("compressible", [True, False])
async def test_an_upload_of_many_batches_arrives_whole(api: Api, compressible: bool) -> None:
    """Several MiB in small pieces: the batches are hashed and written while the next ones
    come in, in order; the first batch, not the first few bytes, decides the stored form."""
    data = (b"a kernel image " * 400_000) if compressible else os.urandom(5 * 2**20 + 17)
    sha = hashlib.sha256(data).hexdigest()
    put = await api.client.put(f"/v1/objects/{sha}", data=_pieces(data, 4096), headers=ADMIN)
    assert put.status == 201 and (await put.json()) == {"sha256": sha, "size": len(data)}
    assert api.store.object_path(sha).suffix == (".zst" if compressible else ".raw")
    path = api.store.object_path(sha)
    stored = b"".join(content_chunks(path, len(data), raw=not compressible))
    assert stored == data
    assert not any((api.store.root / "tmp").iterdir())


async def test_an_upload_in_one_byte_chunks_is_written_in_bounded_batches(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body sent as one-byte HTTP chunks arrives whole, and no batch held more than
    ``UPLOAD_PIECES`` of them (each piece is a Python object until it is written)."""
    writes: list[int] = []
    real_write = ObjectWriter.write

    def write(self: ObjectWriter, chunk: bytes) -> None:
        writes.append(len(chunk))
        real_write(self, chunk)

    monkeypatch.setattr(ObjectWriter, "write", write)
    data = os.urandom(3 * images_api.UPLOAD_PIECES + 5)
    sha = hashlib.sha256(data).hexdigest()
    put = await api.client.put(f"/v1/objects/{sha}", data=_pieces(data, 1), headers=ADMIN)
    assert put.status == 201 and (await put.json()) == {"sha256": sha, "size": len(data)}
    assert sum(writes) == len(data) and max(writes) <= images_api.UPLOAD_PIECES
    assert b"".join(content_chunks(api.store.object_path(sha), len(data), raw=True)) == data


async def test_a_tampered_or_cut_upload_leaves_nothing(api: Api) -> None:
    data = os.urandom(4 * 2**20)
    sha = hashlib.sha256(data).hexdigest()
    wrong = await api.client.put(f"/v1/objects/{'2' * 64}", data=_pieces(data, 65536),
                                 headers=ADMIN)  # fmt: skip
    assert wrong.status == 422 and "tampered or truncated" in (await wrong.json())["error"]
    with pytest.raises(aiohttp.ClientError):
        await api.client.put(f"/v1/objects/{sha}", data=_pieces(data, 65536, 3 * 2**20),
                             headers=ADMIN)  # fmt: skip
    for _ in range(100):  # the server's handler ends on its own time
        if not any((api.store.root / "tmp").iterdir()):
            break
        await asyncio.sleep(0.05)
    assert not any((api.store.root / "tmp").iterdir())
    assert not api.store.has_object(sha) and api.store.objects() == set()
    again = await api.client.put(f"/v1/objects/{sha}", data=data, headers=ADMIN)
    assert again.status == 201 and api.store.has_object(sha)


async def test_user_data_over_its_limit_names_the_field(api: Api) -> None:
    body = {"name": "u1", "kernel": {"kernel": str(api.kernel)}, "start": False}
    assert (await api.client.post("/v1/vms", json=body, headers=ADMIN)).status == 201
    resp = await api.client.put("/v1/vms/u1/user-data", data=b"x" * (300 * 1024), headers=ADMIN)
    answer = await resp.json()
    assert resp.status == 413 and answer["field"] == "user_data"
    assert api.manager.get("u1").user_data == ""
