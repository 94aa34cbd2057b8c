"""The OCI archive gate: a good image passes, every kind of malformed or unsafe one is refused
with a message naming the layer and entry, and no byte string makes it raise anything else."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery.containers.oci import (
    Archive,
    ImageRefused,
    _parse_manifest,
    check_image,
    split_reference,
)
from hatchery_lab.oci_images import Entry, bad_images, busybox_layer, web_image, write_archive

BUSYBOX = b"\x7fELF fake busybox"


def _check(path: Path, tag: str | None = None) -> None:
    with Archive(path) as archive:
        check_image(archive, tag)


def _one(tmp_path: Path, *layers: list[Entry]) -> Path:
    return write_archive(tmp_path / "x.tar", [busybox_layer(BUSYBOX), *layers],
                         entrypoint=["/bin/sh"])  # fmt: skip


def test_the_web_image_passes_with_its_whiteout(tmp_path: Path) -> None:
    path = web_image(tmp_path / "web.tar", BUSYBOX, tag="1")
    with Archive(path) as archive:
        image = check_image(archive, "1")
    assert image.config.entrypoint == ("/start",)
    assert [layer.compression for layer in image.layers] == ["gzip"] * 3
    assert image.entries == 3 + 4 + 1


def test_an_absolute_symlink_is_kept_inside_the_root(tmp_path: Path) -> None:
    _check(_one(tmp_path, [Entry("usr", "dir"), Entry("usr/sh", "symlink", link="/bin/busybox")]))


@pytest.mark.parametrize(("kind", "words"), [
    ("digest", "does not match its digest"),
    ("traversal", "climbs out of the root"),
    ("symlink", "leaves the image's root"),
])  # fmt: skip
def test_the_bad_images_are_refused(tmp_path: Path, kind: str, words: str) -> None:
    with pytest.raises(ImageRefused, match=words):
        _check(bad_images(tmp_path, BUSYBOX)[kind])


@pytest.mark.parametrize(("layer", "words"), [
    ([Entry("/etc/passwd", data=b"x")], "absolute path"),
    ([Entry("etc", "symlink", link="/etc"), Entry("etc/passwd", data=b"root::0:0")],
     "written through the symlink etc"),
    ([Entry("dev/sda", "chardev")], "device node"),
    ([Entry("h", "hardlink", link="../../etc/shadow")], "climbs out"),
    ([Entry("bin/sh", data=b"replaces the symlink")], "replaces a symlink"),
    ([Entry("bad\nname", data=b"")], "control characters"),
    ([Entry("www/.wh..", data=b"")], "names nothing"),
])  # fmt: skip
def test_unsafe_entries_are_refused(tmp_path: Path, layer: list[Entry], words: str) -> None:
    with pytest.raises(ImageRefused, match=words):
        _check(_one(tmp_path, layer))


def test_a_whiteout_lets_a_later_layer_replace_a_symlink(tmp_path: Path) -> None:
    _check(_one(tmp_path, [Entry("bin/.wh.sh"), Entry("bin/sh", data=b"#!/bin/busybox sh\n")]))


@pytest.mark.parametrize("layer", [
    # rm -rf rootfs/etc/passwd would follow the lower layer's etc -> /etc
    [Entry("etc/.wh.passwd")],
    [Entry("etc/.wh..wh..opq")],
    # the whiteout file itself unpacked through a symlink made earlier in the same layer
    [Entry("up", "symlink", link="/"), Entry("up/etc/.wh.shadow")],
])  # fmt: skip
def test_whiteouts_never_lead_through_a_symlink(tmp_path: Path, layer: list[Entry]) -> None:
    with pytest.raises(ImageRefused, match="through the symlink"):
        _check(_one(tmp_path, [Entry("etc", "symlink", link="/etc")], layer))


def test_a_symlink_made_by_a_lower_layer_is_not_written_through(tmp_path: Path) -> None:
    with pytest.raises(ImageRefused, match="layer 2: .* through the symlink"):
        _check(_one(tmp_path, [Entry("up", "symlink", link="/")],
                    [Entry("up/etc/passwd", data=b"x")]))  # fmt: skip


def test_an_archive_of_one_image_serves_whatever_the_store_calls_it(tmp_path: Path) -> None:
    _check(web_image(tmp_path / "web.tar", BUSYBOX, tag="1"), "2")


def test_zstd_layers_are_refused_with_a_hint() -> None:
    manifest = {"schemaVersion": 2, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": "sha256:" + "0" * 64, "size": 2}, "layers": [{
        "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
        "digest": "sha256:" + "1" * 64, "size": 10}]}  # fmt: skip
    with pytest.raises(ImageRefused, match="only tar and tar\\+gzip") as refused:
        _parse_manifest(json.dumps(manifest).encode())
    assert refused.value.hint is not None and "gzip" in refused.value.hint


def test_not_a_layout(tmp_path: Path) -> None:
    path = tmp_path / "plain.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        data = json.dumps([{"Config": "x"}]).encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageRefused, match="no index.json"):
        _check(path)


def test_split_reference() -> None:
    assert split_reference("web") == ("web", "latest")
    assert split_reference("web:1") == ("web", "1")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fuzz_any_change_is_refused_or_passes_never_crashes(
    tmp_path: Path, data: st.DataObject
) -> None:
    """Flip, cut or splice bytes of a good archive: the gate says yes or ImageRefused."""
    good = web_image(tmp_path / "good.tar", BUSYBOX).read_bytes()
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "fuzzed.tar"
    path.write_bytes(bytes(raw))
    try:
        _check(path)
    except ImageRefused:
        pass


def test_an_archive_of_too_many_members_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(4097):
            tar.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))
    with pytest.raises(ImageRefused, match="more than 4096 members"):
        Archive(path)
