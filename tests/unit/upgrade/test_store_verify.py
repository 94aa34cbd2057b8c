"""Store objects are re-verified before a patch or a reboot uses them (issue 14).

A real image store with signed images and a real key directory: an image whose key was
removed from the trusted keys since it was stored, or whose object changed on /data, is
refused with a message that says why; an untouched one still upgrades, in both modes. On
main the upgrade read objects with ``open_object`` ("not verified") and applied both.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zstandard

from hatchery.errors import HatcheryError
from hatchery.images.signing import KeyDirectory, KeyPair, generate_key, sign_build_dir
from hatchery.images.store import CorruptObject, ImageStore
from hatchery.upgrade import reboot
from hatchery.upgrade.controller import UpgradeError, Upgrader
from hatchery.upgrade.model import Mode, Phase
from hatchery.upgrade.store_source import StoreImages
from tests.support.synthetic_images import make_build
from tests.support.upgrade_roots import RELEASE, root_image, unpack, wait_done


class Node:
    """A root on v1, a store holding signed v1 and v2, the trusted keys in a folder."""

    def __init__(self, tmp_path: Path) -> None:
        self.root, self.state = tmp_path / "root", tmp_path / "state"
        self.root.mkdir()
        self.state.mkdir()
        unpack(root_image("v1"), self.root)
        self.keys = tmp_path / "image-keys"
        self.key: KeyPair = generate_key(self.keys)
        self.store = ImageStore(tmp_path / "store")
        self.jumps: list[Path] = []
        self._staged: Path | None = None
        for version in ("v1", "v2"):
            initrd = zstandard.ZstdCompressor().compress(root_image(version))
            build = make_build(tmp_path / "builds", version, kernel=b"kernel-1", initrd=initrd)
            manifest, _ = sign_build_dir(build, self.key.private)
            for name in ("hypervisor.vmlinuz", "hypervisor.cpio.zst"):
                self.store.put_file(build / name)
            self.store.add_image(manifest.read_bytes(), KeyDirectory(self.keys).trusted())
        self.store.set_current("v1")

    def version(self) -> str:
        return (self.root / "usr/lib/os-release").read_text().strip().split("=", 1)[1]

    def upgrader(self) -> Upgrader:
        images = StoreImages(self.store, KeyDirectory(self.keys))
        return Upgrader(self.state, images, self.root, version=self.version,
                        kernel_release=RELEASE, kexec=self)  # fmt: skip

    # --- reboot.Kexec: where the node would have jumped (its staged folder) ----------------
    def load(self, staged: Path) -> bool:
        self._staged = staged
        return True

    def unload(self) -> None:
        self._staged = None

    def jump(self, loaded: bool) -> None:
        assert loaded and self._staged is not None
        self.jumps.append(self._staged)

    def object_of(self, version: str, role: str) -> Path:
        manifest = self.store.manifest(version).manifest
        artefact = next(a for r, a in manifest.artefacts.items() if r == role)
        return self.store.object_path(artefact.sha256)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


@pytest.mark.parametrize("mode", [Mode.LIVE, Mode.REBOOT])
async def test_an_untouched_image_upgrades(node: Node, mode: Mode) -> None:
    upgrader = node.upgrader()
    code, _ = await upgrader.request("v2", mode)
    assert code == 202
    if mode is Mode.LIVE:
        await wait_done(upgrader)
        assert upgrader.status.state is Phase.DONE, upgrader.status
        assert node.version() == "v2" and node.store.current() == "v2"
        return
    for _ in range(200):
        if node.jumps:
            break
        await asyncio.sleep(0.02)
    staged = reboot.boot_dir(node.state) / "v2"
    assert node.jumps == [staged]
    assert (staged / "vmlinuz").read_bytes() == b"kernel-1"
    assert (staged / "initrd").read_bytes() == zstandard.ZstdCompressor().compress(root_image("v2"))
    await upgrader.close()


@pytest.mark.parametrize("mode", [Mode.LIVE, Mode.REBOOT])
async def test_an_image_whose_key_was_removed_is_refused(node: Node, mode: Mode) -> None:
    node.key.public.unlink()  # the key is retired after the image was stored
    upgrader = node.upgrader()
    with pytest.raises(UpgradeError) as err:
        await upgrader.request("v2", mode)
    assert err.value.status == 422
    assert "image v2 cannot be used" in err.value.message
    assert "does not trust" in err.value.message, err.value.message
    assert err.value.hint is not None and "public key" in err.value.hint
    assert upgrader.status.state is Phase.IDLE and node.version() == "v1" and not node.jumps


@pytest.mark.parametrize("mode", [Mode.LIVE, Mode.REBOOT])
@pytest.mark.parametrize("change", ["other content", "flipped byte"])
async def test_an_object_changed_on_disk_is_refused(node: Node, mode: Mode, change: str) -> None:
    path = node.object_of("v2", "initrd")
    if change == "other content":  # a valid zstd stream of another root
        other = zstandard.ZstdCompressor().compress(root_image("v2", extra=b"evil"))
        path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(other))
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    upgrader = node.upgrader()
    with pytest.raises(UpgradeError) as err:
        await upgrader.request("v2", mode)
    assert err.value.status == 422
    assert "image v2 cannot be used" in err.value.message, err.value.message
    assert upgrader.status.state is Phase.IDLE and node.version() == "v1" and not node.jumps
    assert not (reboot.boot_dir(node.state) / "v2").exists()


def test_reading_an_artefact_checks_its_hash_at_the_end(node: Node) -> None:
    """The second line of defence: an object changed after ``verify`` still fails before
    anything uses it: when opened if the store keeps it as built (its file changed since it
    was checked, so it is checked again), at the end of the read if zstd."""
    images = StoreImages(node.store, KeyDirectory(node.keys))
    images.verify("v2")
    for role in ("kernel", "initrd"):
        path = node.object_of("v2", role)
        path.write_bytes(zstandard.ZstdCompressor().compress(b"other " + role.encode()))
        with pytest.raises(CorruptObject), images.open_artefact("v2", role) as raw:
            raw.read()
    zst = node.store.put([b"compressible " * 1000])
    assert node.store.object_path(zst).suffix == ".zst"
    node.store.object_path(zst).write_bytes(zstandard.ZstdCompressor().compress(b"other"))
    with node.store.open_object(zst) as raw:  # unchecked: what the read path guards
        assert raw.read() == b"other"
    with pytest.raises(CorruptObject):
        b"".join(node.store.read_object(zst))


def test_an_artefact_kept_as_built_is_checked_before_staging_links_it(node: Node) -> None:
    """Reboot staging links an object the store keeps as is: ``checked_file`` checks it
    first (once per change of the file), so an object changed after ``verify`` is refused
    there too, and never staged."""
    images = StoreImages(node.store, KeyDirectory(node.keys))
    images.verify("v2")
    path = node.object_of("v2", "initrd")
    assert path.suffix == ".raw"  # a zstd stream: already compressed, kept as is
    assert images.checked_file("v2", "initrd") == path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptObject):
        images.checked_file("v2", "initrd")
    with pytest.raises(HatcheryError):
        reboot.stage(images, node.state, "v2")
    assert not (reboot.boot_dir(node.state) / "v2" / "initrd").exists()
