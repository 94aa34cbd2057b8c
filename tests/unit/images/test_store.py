"""The content-addressed store: put and verify, corrupt objects, images, pointers, gc, export."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from hatchery.images import store as store_module
from hatchery.images.manifest import Role
from hatchery.images.signing import (
    BadSignature,
    KeyPair,
    TrustedKeys,
    UnknownKey,
    generate_key,
    load_public_key,
)
from hatchery.images.store import (
    CorruptObject,
    ImageConflict,
    ImageNotFound,
    ImageStore,
    MissingObjects,
    ObjectNotFound,
    StoreError,
)
from tests.support.synthetic_images import signed_build


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture
def key(tmp_path: Path) -> KeyPair:
    return generate_key(tmp_path / "keys")


@pytest.fixture
def trusted(key: KeyPair) -> TrustedKeys:
    return TrustedKeys.of([load_public_key(key.public)])


def _publish(store: ImageStore, build: Path, raw: bytes, trusted: TrustedKeys) -> None:
    for name in ("hypervisor.vmlinuz", "hypervisor.cpio.zst"):
        store.put_file(build / name)
    store.add_image(raw, trusted)


def test_put_compresses_names_by_content_and_reads_back(store: ImageStore) -> None:
    data = b"hatchery " * 100_000
    sha = store.put([data[:1000], data[1000:]])
    assert sha == hashlib.sha256(data).hexdigest()
    path = store.object_path(sha)
    assert path == store.root / "objects" / sha[:2] / f"{sha}.zst"
    assert path.stat().st_size < len(data) // 10
    assert zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes()) == data
    assert b"".join(store.read_object(sha, len(data))) == data
    with store.open_object(sha) as stream:
        assert stream.read() == data
    store.verify_object(sha, len(data))
    assert store.objects() == {sha}
    assert list((store.root / "tmp").iterdir()) == []


def test_put_with_a_wrong_name_is_refused_and_leaves_nothing(store: ImageStore) -> None:
    with pytest.raises(CorruptObject, match="not " + "0" * 64):
        store.put([b"content"], expected="0" * 64)
    assert store.objects() == set()
    assert list((store.root / "tmp").iterdir()) == []


def test_a_corrupt_object_is_detected_and_quarantined(store: ImageStore) -> None:
    data = os.urandom(200_000)
    sha = store.put([data])
    path = store.object_path(sha)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptObject):
        store.verify_object(sha, len(data))
    assert not store.has_object(sha)
    assert len(list((store.root / "quarantine").iterdir())) == 1
    with pytest.raises(ObjectNotFound):
        store.verify_object(sha)


def test_a_valid_zstd_of_other_content_is_corrupt(store: ImageStore) -> None:
    sha = store.put([b"the real content"])
    store.object_path(sha).write_bytes(zstandard.ZstdCompressor().compress(b"other content"))
    with pytest.raises(CorruptObject, match="hashes to something else"):
        store.verify_object(sha)
    with pytest.raises(ObjectNotFound):
        list(store.read_object(sha))


def test_adopting_a_download_checks_content_size_and_trailing_bytes(
    store: ImageStore, tmp_path: Path
) -> None:
    data = os.urandom(100_000)
    sha = hashlib.sha256(data).hexdigest()
    good = zstandard.ZstdCompressor().compress(data)
    part = store.partial_path(sha)
    # A compression bomb: more content than the manifest says.
    part.write_bytes(zstandard.ZstdCompressor().compress(b"\0" * 50_000_000))
    with pytest.raises(CorruptObject, match="more than"):
        store.adopt(sha, part, len(data), raw=False)
    part.write_bytes(good + b"trailing garbage")
    with pytest.raises(CorruptObject):
        store.adopt(sha, part, len(data), raw=False)
    part.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptObject):
        store.adopt(sha, part, len(data), raw=False)
    assert not store.has_object(sha)
    part.write_bytes(good)
    store.adopt(sha, part, len(data), raw=False)
    assert store.has_object(sha) and not part.exists()
    assert b"".join(store.read_object(sha, len(data))) == data


def test_compressed_content_is_kept_as_it_is_and_reads_back(store: ImageStore) -> None:
    """Content that is already compressed is stored as is (``.raw``): no zstd pass on the
    way in or out, the file usable in place; hashed and checked like any object."""
    data = os.urandom(3 << 20)
    sha = store.put([data[:12345], data[12345:]])
    path = store.object_path(sha)
    assert path == store.root / "objects" / sha[:2] / f"{sha}.raw"
    assert path.read_bytes() == data and store.raw_path(sha) == path
    assert b"".join(store.read_object(sha, len(data))) == data
    with store.open_object(sha) as stream:
        assert stream.read() == data
    store.verify_object(sha, len(data))
    assert store.objects() == {sha} and store.usage() == len(data)
    compressible = store.put([b"hatchery " * 1000])
    assert store.raw_path(compressible) is None
    assert store.object_path(compressible).suffix == ".zst"
    # A flipped byte in a kept-as-is object is caught like one in a zstd object.
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(CorruptObject):
        store.verify_object(sha, len(data))
    assert not store.has_object(sha)


def test_a_raw_download_is_checked_and_replaces_the_zstd_form(store: ImageStore) -> None:
    """A peer may send an object as is: the same checks (size, sha256) before it enters, and
    an object never lies twice in the store (the older zstd form of it goes)."""
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    zst = store.root / "objects" / sha[:2] / f"{sha}.zst"
    zst.parent.mkdir(parents=True, exist_ok=True)
    zst.write_bytes(zstandard.ZstdCompressor().compress(data))  # as an older agent stored it
    assert store.objects() == {sha} and store.raw_path(sha) is None
    part = store.partial_path(sha, raw=True)
    assert part.name == f"{sha}.raw.part"
    for bad in (data + b"x", data[:-1], os.urandom(len(data))):
        part.write_bytes(bad)
        with pytest.raises(CorruptObject):
            store.adopt(sha, part, len(data), raw=True)
        assert store.raw_path(sha) is None
    part.write_bytes(data)
    store.adopt(sha, part, len(data), raw=True)
    assert store.raw_path(sha) is not None and not zst.exists() and not part.exists()
    assert store.objects() == {sha}
    assert b"".join(store.read_object(sha, len(data))) == data


def test_an_image_is_added_only_when_signed_and_complete(
    store: ImageStore, tmp_path: Path, key: KeyPair, trusted: TrustedKeys
) -> None:
    build, raw = signed_build(tmp_path, "1.0", key)
    with pytest.raises(MissingObjects) as missing:
        store.add_image(raw, trusted)
    assert len(missing.value.missing) == 2
    store.put_file(build / "hypervisor.vmlinuz")
    with pytest.raises(MissingObjects):
        store.add_image(raw, trusted)
    store.put_file(build / "hypervisor.cpio.zst")
    with pytest.raises(UnknownKey):
        store.add_image(raw, TrustedKeys({}))
    tampered = raw.replace(b'"version": "1.0"', b'"version": "1.1"')
    with pytest.raises(BadSignature):
        store.add_image(tampered, trusted)
    assert store.versions() == []
    signed = store.add_image(raw, trusted)
    assert store.versions() == ["1.0"]
    assert store.manifest("1.0") == signed
    assert store.add_image(raw, trusted) == signed  # the same image again: a no-op


def test_a_corrupt_object_stops_the_image(
    store: ImageStore, tmp_path: Path, key: KeyPair, trusted: TrustedKeys
) -> None:
    build, raw = signed_build(tmp_path, "1.0", key)
    store.put_file(build / "hypervisor.vmlinuz")
    sha = store.put_file(build / "hypervisor.cpio.zst")
    store.object_path(sha).write_bytes(zstandard.ZstdCompressor().compress(b"evil"))
    with pytest.raises(CorruptObject):
        store.add_image(raw, trusted)
    assert store.versions() == []


def test_versions_are_immutable(
    store: ImageStore, tmp_path: Path, key: KeyPair, trusted: TrustedKeys
) -> None:
    build, raw = signed_build(tmp_path / "a", "1.0", key)
    _publish(store, build, raw, trusted)
    other, other_raw = signed_build(tmp_path / "b", "1.0", key)
    with pytest.raises(ImageConflict):
        _publish(store, other, other_raw, trusted)
    assert store.manifest_bytes("1.0") == raw


def test_pointers_gc_and_export(
    store: ImageStore, tmp_path: Path, key: KeyPair, trusted: TrustedKeys
) -> None:
    builds = {}
    for version in ("1", "2", "3", "4"):
        build, raw = signed_build(tmp_path, version, key)
        _publish(store, build, raw, trusted)
        builds[version] = build
    assert store.current() is None
    with pytest.raises(ImageNotFound):
        store.set_current("9")
    with pytest.raises(ImageNotFound):
        store.set_current("../x")
    store.set_current("2")
    store.set_current("3")
    store.set_current("3")
    assert (store.current(), store.previous()) == ("3", "2")
    orphan = store.put([b"an upload no image names"])
    partial = store.partial_path("a" * 64)
    partial.write_bytes(b"old partial download")
    os.utime(partial, (0, 0))
    before = store.usage()
    report = store.gc()
    assert report.kept == ("2", "3")
    assert report.removed_images == ("1", "4")
    assert report.removed_objects == 5
    assert report.freed_bytes == before - store.usage()
    assert store.versions() == ["2", "3"]
    assert not store.has_object(orphan) and not partial.exists()
    for version in ("2", "3"):
        for artefact in store.manifest(version).manifest.artefacts.values():
            store.verify_object(artefact.sha256, artefact.size)
    out = store.export("3", tmp_path / "boot")
    assert set(out) == {Role.KERNEL, Role.INITRD}
    for path in out.values():
        assert path.read_bytes() == (builds["3"] / path.name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "boot").iterdir()) == [
        "hypervisor.cpio.zst",
        "hypervisor.vmlinuz",
    ]


def test_export_refuses_a_corrupt_object_and_writes_nothing(
    store: ImageStore, tmp_path: Path, key: KeyPair, trusted: TrustedKeys
) -> None:
    build, raw = signed_build(tmp_path, "1", key)
    _publish(store, build, raw, trusted)
    initrd = store.manifest("1").manifest.artefacts[Role.INITRD]
    store.object_path(initrd.sha256).write_bytes(zstandard.ZstdCompressor().compress(b"x" * 10))
    with pytest.raises(CorruptObject):
        store.export("1", tmp_path / "boot")
    assert not (tmp_path / "boot" / initrd.name).exists()
    assert [p.name for p in (tmp_path / "boot").iterdir() if p.name.startswith(".")] == []


def test_export_links_what_the_store_keeps_as_is_without_reading_it(
    store: ImageStore,
    tmp_path: Path,
    key: KeyPair,
    trusted: TrustedKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Random artefacts are kept as is (``.raw``): exported as hard links to the objects,
    which this store has just checked, so the export reads nothing (an emulated node spent
    9 s copying and hashing an image for births)."""
    build, raw = signed_build(tmp_path, "1", key)
    _publish(store, build, raw, trusted)

    def no_read(*args: object) -> None:
        raise AssertionError("an object checked and unchanged was read again")

    monkeypatch.setattr(store, "check_file", no_read)
    out = store.export("1", tmp_path / "boot")
    for role, path in out.items():
        artefact = store.manifest("1").manifest.artefacts[role]
        stored = store.raw_path(artefact.sha256)
        assert stored is not None and path.stat().st_ino == stored.stat().st_ino
        assert path.read_bytes() == (build / path.name).read_bytes()
        assert path.stat().st_mode & 0o777 == 0o644


def test_bad_names_are_refused(store: ImageStore) -> None:
    for bad in ("../" + "a" * 61, "A" * 64, "a" * 63):
        with pytest.raises(StoreError):
            store.object_path(bad)
    with pytest.raises(ImageNotFound):
        store.manifest_bytes("../../etc/passwd")


def test_compressed_content_is_stored_nearly_as_is_and_text_is_compressed(
    store: ImageStore,
) -> None:
    """An initrd or kernel arrives compressed already: recompressing it at level 3 gains
    nothing and costs 3x the CPU, so its object holds raw zstd blocks; other content is still
    compressed. Both read back exactly, in the same zstd format."""
    text = b"".join(f"line {i} of a manifest-like text\n".encode() for i in range(200_000))
    packed = os.urandom(3_000_000)  # as incompressible as a .cpio.zst or a bzImage
    for content in (text, packed, b""):
        sha = store.put([content[i : i + (1 << 20)] for i in range(0, len(content), 1 << 20)])
        stored = store.object_path(sha).stat().st_size
        if content is text:
            assert stored < len(text) // 10
        elif content is packed:
            assert len(packed) <= stored < len(packed) * 1.01 + 64
        assert b"".join(store.read_object(sha, len(content))) == content
        store.verify_object(sha, len(content))


def test_an_object_checked_by_this_store_is_not_hashed_again_until_it_changes(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding an image right after uploading its objects must not read 100 MB again (an
    emulated node's publish time); any change to the object's file, or another process,
    means a full check."""
    reads: list[Path] = []
    real = store_module.content_chunks

    def counted(path: Path, limit: int, raw: bool) -> Iterator[bytes]:
        reads.append(path)
        return real(path, limit, raw)

    monkeypatch.setattr(store_module, "content_chunks", counted)
    data = os.urandom(300_000)
    sha = store.put([data])
    store.verify_object(sha, len(data))
    assert reads == []
    with pytest.raises(CorruptObject):  # a size the content does not have: checked in full
        store.verify_object(sha, len(data) + 1)
    sha = store.put([data])
    ImageStore(store.root).verify_object(sha, len(data))  # another process: checked in full
    assert len(reads) == 2
    raw = bytearray(store.object_path(sha).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    store.object_path(sha).write_bytes(bytes(raw))  # same size, same inode, new ctime
    with pytest.raises(CorruptObject):
        store.verify_object(sha, len(data))


def test_listeners_hear_of_added_images_and_a_new_current_only(
    store: ImageStore, tmp_path: Path, key: KeyPair, trusted: TrustedKeys
) -> None:
    """What the netboot export waits on: an image added, the current one changed; nothing for
    a publish repeated or a current set again, and a failing listener fails no publish."""
    heard: list[str] = []

    def broken() -> None:
        raise RuntimeError("a listener's bug")

    stop_hearing = store.on_change(lambda: heard.append(store.current() or "-"))
    store.on_change(broken)
    build, raw = signed_build(tmp_path / "b1", "1", key)
    _publish(store, build, raw, trusted)
    assert heard == ["-"]
    _publish(store, build, raw, trusted)  # the same image again: a no-op
    store.set_current("1")
    store.set_current("1")
    assert heard == ["-", "1"]
    stop_hearing()
    build, raw = signed_build(tmp_path / "b2", "2", key)
    _publish(store, build, raw, trusted)
    assert heard == ["-", "1"] and store.versions() == ["1", "2"]
