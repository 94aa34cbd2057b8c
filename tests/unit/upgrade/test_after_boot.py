"""How a reboot-mode upgrade ends, decided by the agent that comes up afterwards."""

from __future__ import annotations

from pathlib import Path

from hatchery.upgrade.controller import Phase, Upgrader
from hatchery.upgrade.reboot import after_boot, boot_dir
from tests.unit.upgrade.test_controller import DirImages, root_image


class Vms:
    """A small VmControl: remembers which VMs were restored."""

    def __init__(self) -> None:
        self.restored: list[str] = []

    def running_names(self) -> list[str]:
        return []

    async def stop_for_reboot(self, name: str) -> None:
        return None

    async def restore(self, name: str) -> None:
        self.restored.append(name)


def pending(state: Path, version: str, previous: str, fallback: str | None = None) -> Path:
    d = boot_dir(state) / "pending"
    d.mkdir(parents=True)
    (d / "version").write_text(version + "\n")
    (d / "previous").write_text(previous + "\n")
    (d / "restore").write_text("web1\ndb1\n")
    if fallback:
        (d / "fallback").write_text(fallback + "\n")
    return d


def make(tmp_path: Path, running: str) -> tuple[Upgrader, DirImages, Vms]:
    images = DirImages(tmp_path / "images")
    images.add("v3", root_image("v3"))
    upgrader = Upgrader(tmp_path, images, tmp_path, version=lambda: running)
    vms = Vms()
    upgrader.vms = vms
    return upgrader, images, vms


async def test_booted_into_the_new_version(tmp_path: Path) -> None:
    upgrader, images, vms = make(tmp_path, "v3")
    d = pending(tmp_path, "v3", "v2")
    await after_boot(upgrader, "v3", vms)
    assert upgrader.status.state is Phase.DONE and upgrader.status.target == "v3"
    assert images.current == "v3" and vms.restored == ["web1", "db1"]
    assert not d.exists()
    assert upgrader.boot_status() == {"fallback": False, "reason": None}


async def test_fell_back_to_the_previous_version(tmp_path: Path) -> None:
    upgrader, images, vms = make(tmp_path, "v3")
    pending(tmp_path, "v4", "v3", fallback="v4 did not become healthy within 90s")
    await after_boot(upgrader, "v3", vms)
    assert upgrader.status.state is Phase.FAILED
    assert upgrader.status.error and "v4 did not become healthy" in upgrader.status.error
    assert upgrader.boot_status()["fallback"] is True
    assert vms.restored == ["web1", "db1"] and images.current is None


async def test_nothing_pending_is_nothing_to_do(tmp_path: Path) -> None:
    upgrader, _, vms = make(tmp_path, "v3")
    await after_boot(upgrader, "v3", vms)
    assert upgrader.status.state is Phase.IDLE and vms.restored == []
