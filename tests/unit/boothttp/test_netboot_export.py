"""The netboot export follows the store: an image published into a node that births others
is served at once, not at the next periodic refresh (a machine PXE-booted in between was
refused the kernel and waited for its firmware's retry)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from pathlib import Path

import pytest

from hatchery import netboot as netboot_module
from hatchery.config import BootServiceConfig
from hatchery.images.manifest import SIGNED_NAME
from hatchery.images.signing import TrustedKeys, load_public_key
from hatchery.images.store import ImageStore
from hatchery.netboot import Netboot
from tests.support.synthetic_images import keypair, signed_build

BOOT = BootServiceConfig(
    births_start=ipaddress.IPv4Address("10.9.0.50"),
    births_end=ipaddress.IPv4Address("10.9.0.59"),
)


def publish_v1(store: ImageStore, tmp_path: Path) -> tuple[Path, bytes]:
    """A signed build v1 published into ``store``: the build and its signed manifest."""
    key = keypair(tmp_path)
    build, raw = signed_build(tmp_path / "build", "v1", key)
    for name in ("hypervisor.vmlinuz", "hypervisor.cpio.zst"):
        store.put_file(build / name)
    store.add_image(raw, TrustedKeys.of([load_public_key(key.public)]))
    return build, raw


async def test_a_published_image_is_exported_for_births_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netboot_module, "REFRESH_SECONDS", 3600.0)  # only a change can wake it
    store = ImageStore(tmp_path / "store")
    netboot = Netboot("br0", BOOT, tmp_path / "state", store, lambda: "v1")
    netboot._listen_to_the_store()
    refresher = asyncio.create_task(netboot._refresher())
    try:
        await asyncio.sleep(0.1)  # the refresher waits on the store
        served = netboot.root / "hypervisor" / "current" / "initrd"
        assert not served.exists()
        # as the API does it: in a worker thread
        build, _ = await asyncio.to_thread(publish_v1, store, tmp_path)
        async with asyncio.timeout(30):
            while not served.exists():
                await asyncio.sleep(0.02)
        assert served.read_bytes() == (build / "hypervisor.cpio.zst").read_bytes()
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await netboot.stop()


def test_the_export_carries_the_signed_manifest_and_an_older_one_is_redone(
    tmp_path: Path,
) -> None:
    """Nodes born from here take their image with it (images.booted); an export an older
    agent made has none, and is made again."""
    store = ImageStore(tmp_path / "store")
    build, raw = publish_v1(store, tmp_path)
    netboot = Netboot("br0", BOOT, tmp_path / "state", store, lambda: "v1")
    netboot.refresh()
    served = netboot.root / "hypervisor" / "current"
    assert (served / SIGNED_NAME).read_bytes() == raw
    assert (served / SIGNED_NAME).stat().st_mode & 0o777 == 0o644
    (served / SIGNED_NAME).unlink()  # as an agent before the manifest was exported left it
    netboot.refresh()
    assert (served / SIGNED_NAME).read_bytes() == raw
    assert (served / "initrd").read_bytes() == (build / "hypervisor.cpio.zst").read_bytes()
