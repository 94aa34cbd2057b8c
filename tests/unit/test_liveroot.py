"""The live root's initrd, the parts that need no image build: module load order from a
``modules.dep``, the members and their order, and the init script's syntax (busybox's own
shell, the one that runs it). Booting it is tests/image/test_live_root.py."""

from __future__ import annotations

import io
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from hatchery.cpio import iter_newc
from hatchery_lab.cpio_writer import write_newc
from hatchery_lab.liveroot import (
    INIT,
    INIT_MODULES,
    ROOT_IMAGE,
    LiveRootError,
    drop_kernel_copies,
    initrd_entries,
    is_live_initrd,
    module_load_order,
    plain_length,
    repack,
    take_busybox,
    unpack_cpio,
    unpack_root,
)
from tests.conftest import missing

MODULES_DEP = """kernel/drivers/block/loop.ko:
kernel/fs/squashfs/squashfs.ko: kernel/lib/zstd_fake.ko
kernel/lib/zstd_fake.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
"""


def test_load_order_puts_dependencies_first_once() -> None:
    order = module_load_order(MODULES_DEP, ("loop", "squashfs", "overlay", "ext4", "mbcache"))
    assert order == [
        "kernel/drivers/block/loop.ko",
        "kernel/lib/zstd_fake.ko",
        "kernel/fs/squashfs/squashfs.ko",
        "kernel/fs/overlayfs/overlay.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/mbcache.ko",
        "kernel/fs/ext4/ext4.ko",
    ]
    with pytest.raises(LiveRootError, match="module erofs is not in modules.dep"):
        module_load_order(MODULES_DEP, ("erofs",))


def fake_tree(root: Path, builtin: str = "") -> Path:
    release = root / "usr/lib/modules/6.1.0-test"
    for line in MODULES_DEP.splitlines():
        path = release / line.partition(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"ELF " + path.name.encode())
    (release / "modules.dep").write_text(MODULES_DEP)
    (release / "modules.builtin").write_text(builtin)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/busybox").write_bytes(b"busybox binary")
    return root


def test_the_initrd_holds_init_busybox_modules_and_the_root_image(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path, builtin="kernel/drivers/block/loop.ko\n")
    busybox = take_busybox(tree)
    assert busybox == b"busybox binary"
    assert not (tree / "usr/bin/busybox").exists()  # moved out of the root, not copied
    archive = write_newc(initrd_entries(tree, b"hsqs root image", busybox))
    members = {m.path: (m.mode, data) for m, data in iter_newc(io.BytesIO(archive))}
    assert members["init"] == (0o100755, INIT.encode())
    assert members["bin/busybox"][1] == b"busybox binary"
    assert members[ROOT_IMAGE] == (0o100400, b"hsqs root image")
    # loop is built in here: not loaded; squashfs after what it depends on
    assert members["lib/modules/load-order"][1] == b"zstd_fake.ko\nsquashfs.ko\noverlay.ko\n"
    assert members["lib/modules/squashfs.ko"][1] == b"ELF squashfs.ko"
    assert "lib/modules/loop.ko" not in members
    assert set(INIT_MODULES) == {"loop", "squashfs", "overlay"}
    with pytest.raises(LiveRootError, match="busybox-static"):
        take_busybox(tree)


def test_compressed_modules_go_into_the_initrd_uncompressed(tmp_path: Path) -> None:
    """6.12's modules are .ko.xz, which busybox's insmod cannot load."""
    tree = fake_tree(tmp_path)
    release = tree / "usr/lib/modules/6.1.0-test"
    overlay = release / "kernel/fs/overlayfs/overlay.ko"
    overlay.with_name("overlay.ko.xz").write_bytes(lzma.compress(b"ELF overlay, was xz"))
    overlay.unlink()
    dep = (release / "modules.dep").read_text().replace("overlay.ko:", "overlay.ko.xz:")
    (release / "modules.dep").write_text(dep)
    archive = write_newc(initrd_entries(tree, b"hsqs", b"busybox binary"))
    members = {m.path: data for m, data in iter_newc(io.BytesIO(archive))}
    assert members["lib/modules/overlay.ko"] == b"ELF overlay, was xz"
    assert b"overlay.ko\n" in members["lib/modules/load-order"]


def test_the_kernels_copies_leave_the_root_and_its_config_stays(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    (tree / "boot").mkdir()
    for name in ("vmlinuz-6.1.0-test", "config-6.1.0-test"):
        (tree / "boot" / name).write_bytes(b"x")
    (tree / "usr/lib/modules/6.1.0-test/vmlinuz").write_bytes(b"x")
    removed = drop_kernel_copies(tree)
    assert [str(p.relative_to(tree)) for p in removed] == [
        "boot/vmlinuz-6.1.0-test", "usr/lib/modules/6.1.0-test/vmlinuz"]  # fmt: skip
    assert (tree / "boot/config-6.1.0-test").exists()
    assert (tree / "usr/lib/modules/6.1.0-test/modules.dep").exists()


def test_the_init_script_parses_in_busybox_sh(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        missing("busybox is not installed (package busybox-static)")
    assert busybox is not None
    script = tmp_path / "init"
    script.write_text(INIT)
    result = subprocess.run([busybox, "sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # systemd gets the kernel's arguments for init
    assert 'exec switch_root /sysroot /usr/lib/systemd/systemd "$@"' in INIT


def test_the_initrd_is_a_plain_root_image_then_the_rest_compressed(tmp_path: Path) -> None:
    """``repack`` end to end on a small tree: the first archive is plain and holds only the
    root image (so upgrades mount it where the store keeps the file), 4-byte aligned; the
    second is zstd and holds the rest; the real tools unpack both, as the kernel does."""
    for tool in ("mksquashfs", "cpio", "zstd"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed")
    tree = fake_tree(tmp_path, builtin="kernel/drivers/block/loop.ko\n")
    (tree / "etc").mkdir()
    (tree / "etc/motd").write_text("hello\n")
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=names,
                          capture_output=True, check=True).stdout  # fmt: skip
    mkosi_cpio = tmp_path / "mkosi.cpio.zst"
    mkosi_cpio.write_bytes(zstandard.ZstdCompressor().compress(cpio))
    assert not is_live_initrd(mkosi_cpio)
    initrd = tmp_path / "out" / "hypervisor.cpio.zst"
    initrd.parent.mkdir()
    repack(mkosi_cpio, initrd, 1700000000, lambda _: None)
    with initrd.open("rb") as f:
        plain = plain_length(f)
        [(member, image)] = list(iter_newc(io.BytesIO(f.read(plain))))
        assert f.read(4) == b"\x28\xb5\x2f\xfd"  # then a zstd frame
    assert plain % 4 == 0 and member.path == ROOT_IMAGE and image.startswith(b"hsqs")
    assert is_live_initrd(initrd)
    unpacked = unpack_cpio(initrd, tmp_path / "unpacked")
    assert (unpacked / ROOT_IMAGE).read_bytes() == image
    assert (unpacked / "init").read_text() == INIT
    root = unpack_root(initrd, tmp_path / "root")
    assert (root / "etc/motd").read_text() == "hello\n"
    again = tmp_path / "again" / "hypervisor.cpio.zst"
    again.parent.mkdir()
    repack(mkosi_cpio, again, 1700000000, lambda _: None)
    assert again.read_bytes() == initrd.read_bytes()
