"""Reboot mode: stage the new kernel and root under /data, stop VMs, kexec, restore after.

Files under ``<state>/boot/``:

* ``<version>/vmlinuz`` and ``<version>/initrd``: the staged images (the running version is
  staged too, as the way back);
* ``pending/``: ``version``, ``previous``, ``guard-seconds`` and ``restore`` (VM names, one a
  line) — plain files so the image's boot guard (a shell script that runs before the agent)
  can read them. If the new version does not write ``pending/good`` within ``guard-seconds``
  of booting, the guard kexecs back into ``previous`` and writes ``pending/fallback`` with
  the reason. The agent, at start, finishes the story either way (``after_boot``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hatchery.errors import CommandError, HatcheryError
from hatchery.vms.process import systemd_running

if TYPE_CHECKING:
    from hatchery.upgrade.controller import Upgrader

log = logging.getLogger(__name__)
GUARD_SECONDS = 180


class VmControl(Protocol):
    """What a reboot needs from the VM manager."""

    def running_names(self) -> list[str]: ...

    async def stop_for_reboot(self, name: str) -> None: ...

    async def restore(self, name: str) -> None: ...


def boot_dir(state_dir: Path) -> Path:
    return state_dir / "boot"


def _stage(upgrader: Upgrader, version: str) -> Path:
    target = boot_dir(upgrader.state_dir) / version
    target.mkdir(parents=True, exist_ok=True)
    for role, name in (("kernel", "vmlinuz"), ("initrd", "initrd")):
        out = target / name
        if out.exists():
            continue
        tmp = out.with_name(name + ".tmp")
        with upgrader.images.open_artefact(version, role) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(out)
    return target


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise CommandError(argv, result.returncode, result.stderr)


def kexec_into(staged: Path) -> None:
    """Load ``staged`` and jump: through systemd (clean shutdown) where it runs."""
    _run(["kexec", "-l", str(staged / "vmlinuz"), f"--initrd={staged / 'initrd'}",
          "--reuse-cmdline"])  # fmt: skip
    if systemd_running():
        _run(["systemctl", "kexec"])
    else:
        _run(["kexec", "-e"])


async def reboot_into(upgrader: Upgrader, version: str, vms: VmControl | None = None) -> None:
    from hatchery.health import read_version

    previous = read_version()
    staged = await asyncio.to_thread(_stage, upgrader, version)
    if upgrader.images.has(previous):
        await asyncio.to_thread(_stage, upgrader, previous)
    pending = boot_dir(upgrader.state_dir) / "pending"
    shutil.rmtree(pending, ignore_errors=True)
    pending.mkdir(parents=True)
    restore = vms.running_names() if vms is not None else []
    _write(pending / "restore", "".join(f"{n}\n" for n in restore))
    _write(pending / "previous", previous + "\n")
    _write(pending / "guard-seconds", f"{upgrader.guard_seconds or GUARD_SECONDS}\n")
    _write(pending / "version", version + "\n")  # last: its presence arms the guard
    upgrader.set_status(detail=f"staged {version}; stopping {len(restore)} VMs, then kexec")
    if vms is not None:
        for name in restore:
            await vms.stop_for_reboot(name)
    try:
        await asyncio.to_thread(kexec_into, staged)
    except HatcheryError as exc:
        log.error("kexec failed (%s): rebooting through firmware instead", exc.message)
        if not systemd_running():
            raise
        await asyncio.to_thread(_run, ["systemctl", "reboot"])


def settle_boot(upgrader: Upgrader, running: str) -> list[str]:
    """Decide how a reboot-mode upgrade ended (before the API answers anyone): mark the boot
    good or record the fallback. Returns the VMs to restore once the node's network is up."""
    pending = boot_dir(upgrader.state_dir) / "pending"
    if not (pending / "version").exists():
        return []
    version = (pending / "version").read_text().strip()
    previous = (pending / "previous").read_text().strip()
    restore = [n for n in (pending / "restore").read_text().split() if n]
    fallback = pending / "fallback"
    if running == version:
        _write(pending / "good", f"{time.time()}\n")
        upgrader.images.set_current(version)
        upgrader.set_status(state="done", target=version, finished=time.time(),
                            detail=f"rebooted into {version}")  # fmt: skip
        log.info("booted into %s as planned; %d VMs to restore", version, len(restore))
    else:
        why = fallback.read_text().strip() if fallback.exists() else "booted another version"
        upgrader.set_status(state="failed", target=version, finished=time.time(),
                            error=f"fell back to {running}: {why}", detail="fallback")  # fmt: skip
        log.error("upgrade to %s failed, running %s: %s", version, previous, why)
    shutil.rmtree(pending, ignore_errors=True)
    return restore


async def restore_vms(names: list[str], vms: VmControl | None) -> None:
    if vms is None:
        return
    for name in names:
        with contextlib.suppress(HatcheryError):
            await vms.restore(name)


async def after_boot(upgrader: Upgrader, running: str, vms: VmControl | None) -> None:
    """Both steps at once (tests); the agent settles first and restores VMs last."""
    await restore_vms(settle_boot(upgrader, running), vms)
