"""What the node says about itself in /healthz: image version, failed units, upgrade state.

The version is the image's own ``IMAGE_VERSION`` (os-release, written by mkosi), read on
every request: a live patch replaces the file, so the answer changes with it. The upgrade
and boot-fallback parts come from the upgrade controller when there is one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol

from hatchery.vms.process import systemd_running

OS_RELEASE = Path("/etc/os-release")


def read_version(os_release: Path = OS_RELEASE) -> str:
    """The image version: IMAGE_VERSION in os-release, else ``dev`` (not one of our images)."""
    try:
        for line in os_release.read_text().splitlines():
            if line.startswith("IMAGE_VERSION="):
                return line.split("=", 1)[1].strip().strip('"') or "dev"
    except OSError:
        pass
    return "dev"


def failed_units() -> list[str] | None:
    """Units systemd reports as failed; None where systemd does not run this host."""
    systemctl = shutil.which("systemctl")
    if systemctl is None or not systemd_running():
        return None
    out = subprocess.run(
        [systemctl, "list-units", "--state=failed", "--no-legend", "--plain"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout  # fmt: skip
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class UpgradeView(Protocol):
    def status_json(self) -> dict[str, Any]: ...

    def running_version(self) -> str: ...

    def boot_status(self) -> dict[str, Any]: ...


class NodeHealth:
    """The default ``HealthSource``."""

    def __init__(self, version: str | None = None) -> None:
        self._fixed_version = version
        self.upgrader: UpgradeView | None = None

    def version(self) -> str:
        if self._fixed_version:
            return self._fixed_version
        return self.upgrader.running_version() if self.upgrader else read_version()

    def checks(self) -> dict[str, str]:
        failed = failed_units()
        if failed is None:
            return {}
        return {"units": "ok" if not failed else "fail: " + ", ".join(failed[:10])}

    def upgrade_status(self) -> dict[str, Any]:
        if self.upgrader is None:
            return {"state": "idle", "target": None, "mode": None, "error": None,
                    "started": None, "finished": None, "detail": None}  # fmt: skip
        return self.upgrader.status_json()

    def boot_status(self) -> dict[str, Any]:
        if self.upgrader is None:
            return {"fallback": False, "reason": None}
        return self.upgrader.boot_status()
