"""What the node says about itself in /healthz: image version, failed units, upgrade state.

The upgrade and boot-fallback parts are filled in by the upgrade subsystem; until one runs,
the node reports ``idle`` and no fallback.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchery.vms.process import systemd_running

VERSION_FILE = Path("/etc/hatchery/version")
OS_RELEASE = Path("/etc/os-release")


def read_version(version_file: Path = VERSION_FILE, os_release: Path = OS_RELEASE) -> str:
    """The image version: /etc/hatchery/version, else IMAGE_VERSION in os-release, else dev."""
    try:
        text = version_file.read_text().strip()
        if text:
            return text
    except OSError:
        pass
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


class NodeHealth:
    """The default ``HealthSource``."""

    def __init__(self, version: str | None = None) -> None:
        self._version = version or read_version()
        self.upgrade: dict[str, Any] = {
            "state": "idle", "target": None, "mode": None, "error": None,
            "started": None, "finished": None,
        }  # fmt: skip
        self.boot: dict[str, Any] = {"fallback": False, "reason": None}

    def version(self) -> str:
        return self._version

    def checks(self) -> dict[str, str]:
        failed = failed_units()
        if failed is None:
            return {}
        return {"units": "ok" if not failed else "fail: " + ", ".join(failed[:10])}

    def upgrade_status(self) -> dict[str, Any]:
        return dict(self.upgrade)

    def boot_status(self) -> dict[str, Any]:
        return dict(self.boot)
