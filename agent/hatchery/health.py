"""What the node says about itself in /healthz: image version, failed units, upgrade state.

The version is the image's own ``IMAGE_VERSION`` (os-release, written by mkosi), read on
every request: a live patch replaces the file, so the answer changes with it. The upgrade
and boot-fallback parts come from the upgrade controller when there is one.

Failed units are asked of systemd asynchronously (``/healthz`` is polled by every rollout,
per host) and the answer is kept for ``cache_seconds``: callers that arrive while systemd
is being asked share that one question.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from hatchery import host
from hatchery.errors import HatcheryError
from hatchery.wire import BootStatus, UpgradeStatus

log = logging.getLogger(__name__)
OS_RELEASE = Path("/etc/os-release")
UNITS_CACHE_SECONDS = 2.0

FailedUnits = Callable[[], Awaitable[list[str] | None]]
"""Asks systemd for its failed units; None where there is no systemd (``host.failed_units``)."""


def read_version(os_release: Path = OS_RELEASE) -> str:
    """The image version: IMAGE_VERSION in os-release, else ``dev`` (not one of our images)."""
    try:
        for line in os_release.read_text().splitlines():
            if line.startswith("IMAGE_VERSION="):
                return line.split("=", 1)[1].strip().strip('"') or "dev"
    except OSError:
        pass
    return "dev"


class UpgradeView(Protocol):
    """What health needs from the upgrade controller."""

    @property
    def status(self) -> UpgradeStatus: ...

    def running_version(self) -> str: ...

    def boot_status(self) -> BootStatus: ...


class NodeHealth:
    """The agent's ``HealthSource`` (see ``hatchery.api.app``).

    ``version`` fixes the reported version (tests); else the upgrade controller's view of the
    running root, else /etc/os-release. ``failed_units`` and ``cache_seconds`` are for tests.
    """

    def __init__(
        self,
        version: str | None = None,
        *,
        upgrades: UpgradeView | None = None,
        failed_units: FailedUnits = host.failed_units,
        cache_seconds: float = UNITS_CACHE_SECONDS,
        state_dir: Path | None = None,
    ) -> None:
        self._fixed_version = version
        self._state_dir = state_dir
        self._upgrades = upgrades
        self._failed_units = failed_units
        self._cache_seconds = cache_seconds
        self._units: tuple[float, dict[str, str]] | None = None  # (when, checks)
        self._asking: asyncio.Task[dict[str, str]] | None = None

    def version(self) -> str:
        if self._fixed_version:
            return self._fixed_version
        return self._upgrades.running_version() if self._upgrades else read_version()

    async def checks(self) -> dict[str, str]:
        """``units``: ok, or the failed ones (none where systemd does not run); at most
        ``cache_seconds`` old."""
        now = time.monotonic()
        if self._units is not None and now - self._units[0] < self._cache_seconds:
            return self._units[1]
        if self._asking is None:
            self._asking = asyncio.create_task(self._ask(), name="health-failed-units")
            self._asking.add_done_callback(self._asked)
        # Shielded: a caller that goes away (client disconnected) does not cancel the others'.
        return await asyncio.shield(self._asking)

    async def _ask(self) -> dict[str, str]:
        try:
            failed = await self._failed_units()
        except HatcheryError as exc:
            log.warning("cannot ask systemd for failed units: %s", exc.message)
            return {"units": f"fail: cannot ask systemd: {exc.message}"}
        if failed is None:
            return {}
        return {"units": "ok" if not failed else "fail: " + ", ".join(failed[:10])}

    def _asked(self, task: asyncio.Task[dict[str, str]]) -> None:
        self._asking = None
        if not task.cancelled() and task.exception() is None:
            self._units = (time.monotonic(), task.result())

    def free_bytes(self) -> int | None:
        """Free space on the state folder's file system (what a fetch or a reboot's staging
        needs), for an unprivileged user; None without a state folder."""
        if self._state_dir is None:
            return None
        try:
            return shutil.disk_usage(self._state_dir).free
        except OSError:
            return None

    def upgrade_status(self) -> UpgradeStatus:
        return self._upgrades.status if self._upgrades is not None else UpgradeStatus()

    def boot_status(self) -> BootStatus:
        return self._upgrades.boot_status() if self._upgrades is not None else BootStatus()
