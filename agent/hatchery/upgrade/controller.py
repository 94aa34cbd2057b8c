"""The node's upgrade controller: the state behind ``POST /v1/upgrade`` and ``/healthz``.

One upgrade at a time, its state persisted (``upgrade.json``) so that a restarted agent — the
live patch restarts it last, a reboot starts a new one — reports how it ended. Live mode
patches the running root (see ``livepatch``); reboot mode stages the new kernel and root
under the state folder and kexecs into them (see ``reboot``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from hatchery import state
from hatchery.cpio import CpioError, iter_newc
from hatchery.errors import HatcheryError
from hatchery.health import read_version
from hatchery.upgrade.fingerprint import index_root
from hatchery.upgrade.livepatch import LivePatch, units_to_restart
from hatchery.upgrade.reboot import VmControl, reboot_into, restore_vms, settle_boot
from hatchery.vms.process import systemd_running

log = logging.getLogger(__name__)
AGENT_UNIT = "hatchery-agent.service"


class UpgradeError(HatcheryError):
    """An upgrade request that cannot be carried out; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class Mode(StrEnum):
    LIVE = "live"
    REBOOT = "reboot"


class Phase(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ImageSource(Protocol):
    """What upgrades need from the image store."""

    def has(self, version: str) -> bool: ...

    def open_artefact(self, version: str, role: str) -> BinaryIO:
        """The artefact's bytes as built (the root is a zstd-compressed cpio)."""
        ...

    def artefact_digest(self, version: str, role: str) -> str | None: ...

    def set_current(self, version: str) -> None: ...


@dataclass(frozen=True, slots=True)
class UpgradeStatus:
    state: Phase = Phase.IDLE
    target: str | None = None
    mode: Mode | None = None
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "target": self.target,
            "mode": self.mode.value if self.mode else None,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UpgradeStatus:
        return cls(
            Phase(d.get("state", "idle")),
            d.get("target"),
            Mode(d["mode"]) if d.get("mode") else None,
            d.get("error"),
            d.get("started"),
            d.get("finished"),
            d.get("detail"),
        )


def open_root(stream: BinaryIO) -> BinaryIO:
    """The root archive as a plain cpio stream, whether it is stored zstd-compressed or not."""
    head = stream.read(4)
    rest = io.BufferedReader(_Prepend(head, stream))
    if head == b"\x28\xb5\x2f\xfd":
        reader: BinaryIO = zstandard.ZstdDecompressor().stream_reader(rest)
        return reader
    return rest


class _Prepend(io.RawIOBase):
    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _systemctl(*args: str) -> None:
    if not systemd_running() or shutil.which("systemctl") is None:
        log.info("no systemd here: skipping systemctl %s", " ".join(args))
        return
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise HatcheryError(f"systemctl {' '.join(args)} failed: {result.stderr.strip()}")


class Upgrader:
    def __init__(
        self,
        state_dir: Path,
        images: ImageSource | None,
        root: Path = Path("/"),
        version: Callable[[], str] | None = None,
        kernel_release: str | None = None,
    ) -> None:
        self._file = state_dir / "upgrade.json"
        self._images = images
        self._root = root
        self._version = version or (lambda: read_version(root / "usr/lib/os-release"))
        self._release = kernel_release or platform.release()
        raw = state.read_json(self._file)
        self.status = UpgradeStatus.from_json(raw) if isinstance(raw, dict) else UpgradeStatus()
        if self.status.state is Phase.RUNNING and self.status.mode is Mode.LIVE:
            # The agent is restarted last by a live patch: how did it end?
            if self._version() == self.status.target:
                before = f"{self.status.detail}; " if self.status.detail else ""
                back = f"{before}the agent came back on {self.status.target}"
                self._set(state=Phase.DONE, finished=time.time(), detail=back)
            else:
                self._set(state=Phase.FAILED, error="the agent restarted during the patch")
        self._task: asyncio.Task[None] | None = None
        self.vms: VmControl | None = None
        self.guard_seconds: int | None = None
        self._restore: list[str] = []

    def _set(self, **changes: Any) -> None:
        data = self.status.to_json()
        for key, value in changes.items():
            data[key] = value.value if isinstance(value, StrEnum) else value
        self.status = UpgradeStatus.from_json(data)
        state.write_json(self._file, self.status.to_json())

    def status_json(self) -> dict[str, Any]:
        return self.status.to_json()

    def running_version(self) -> str:
        return self._version()

    # --- requests ---------------------------------------------------------------------
    def request(
        self, version: str, mode: Mode, guard_seconds: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Accept (202), report a no-op (200) or refuse (UpgradeError) an upgrade.

        ``guard_seconds``: reboot mode only, how long the new version has to come up before
        the boot guard falls back to the running one (default ``reboot.GUARD_SECONDS``)."""
        running = self._version()
        if running == "dev":
            raise UpgradeError(
                f"{self._root} does not run a Hatchery image (no IMAGE_VERSION in its "
                "os-release): there is nothing to upgrade", 409,
            )  # fmt: skip
        if self.status.state is Phase.RUNNING:
            if self.status.target == version:
                return 202, self.status_json()  # idempotent: the same upgrade is under way
            raise UpgradeError(
                f"an upgrade to {self.status.target} is running; cannot start one to {version}",
                409,
            )
        if version == running:
            return 200, {**self.status_json(), "state": "done", "target": version,
                         "detail": f"already running {version}: nothing to do"}  # fmt: skip
        if self._images is None or not self._images.has(version):
            raise UpgradeError(
                f"image {version} is not in this node's store", 404,
                hint="publish it (hatchery image publish) or fetch it from a peer first",
            )  # fmt: skip
        if mode is Mode.LIVE:
            self._check_same_kernel(running, version)
        self.guard_seconds = guard_seconds
        self._set(state=Phase.RUNNING, target=version, mode=mode, error=None,
                  started=time.time(), finished=None, detail=None)  # fmt: skip
        runner = self._live if mode is Mode.LIVE else self._reboot
        self._task = asyncio.create_task(self._guard(runner, version), name=f"upgrade-{version}")
        return 202, self.status_json()

    def _check_same_kernel(self, running: str, version: str) -> None:
        assert self._images is not None
        ours = (
            self._images.artefact_digest(running, "kernel") if self._images.has(running) else None
        )
        theirs = self._images.artefact_digest(version, "kernel")
        if ours is not None and theirs is not None and ours != theirs:
            raise UpgradeError(
                f"image {version} has another kernel than {running}: live patch cannot change "
                "the kernel", 422, hint="use --mode reboot",
            )  # fmt: skip
        modules = f"usr/lib/modules/{self._release}/"
        try:
            with self._images.open_artefact(version, "initrd") as raw:
                for member, _ in iter_newc(open_root(raw)):
                    if member.path.startswith(modules) or member.path == modules.rstrip("/"):
                        return
        except (CpioError, zstandard.ZstdError, OSError) as exc:
            raise UpgradeError(f"image {version}'s root cannot be read: {exc}", 422) from exc
        raise UpgradeError(
            f"image {version} has no modules for the running kernel {self._release}: "
            "live patch cannot change the kernel", 422, hint="use --mode reboot",
        )  # fmt: skip

    async def _guard(self, runner: Callable[[str], Any], version: str) -> None:
        try:
            await runner(version)
        except asyncio.CancelledError:
            self._set(
                state=Phase.FAILED, error="cancelled: the agent stopped", finished=time.time()
            )
            raise
        except Exception as exc:
            message = exc.message if isinstance(exc, HatcheryError) else repr(exc)
            log.error("upgrade to %s failed: %s", version, message)
            self._set(state=Phase.FAILED, error=message, finished=time.time())

    # --- live ---------------------------------------------------------------------------
    async def _live(self, version: str) -> None:
        await asyncio.to_thread(self._live_blocking, version)

    def _live_blocking(self, version: str) -> None:
        assert self._images is not None
        running = self._version()
        current = None
        if self._images.has(running):
            with self._images.open_artefact(running, "initrd") as raw:
                current = index_root(open_root(raw))
        else:
            log.warning("running image %s is not in the store: patching without deletions", running)
        patch = LivePatch(self._root, current)
        with self._images.open_artefact(version, "initrd") as raw:
            plan = patch.stage(open_root(raw))
        if not plan.changes:
            self._set(state=Phase.DONE, finished=time.time(), detail="no changes")
            self._images.set_current(version)
            return
        patch.apply(plan)
        patch.commit()
        units = units_to_restart(self._root, plan.changed_paths)
        log.info("live patch to %s applied (%s); restarting %s", version, plan.summary(),
                 ", ".join(units) or "nothing")  # fmt: skip
        _systemctl("daemon-reload")
        others = [u for u in units if u != AGENT_UNIT]
        if others:
            _systemctl("try-restart", *others)
        self._images.set_current(version)
        detail = f"{plan.summary()}; restarted: {', '.join(units) or 'none'}"
        if AGENT_UNIT in units and systemd_running():
            # Our own restart comes last; the new agent reads this file and reports done.
            self._set(detail=detail)
            _systemctl("--no-block", "restart", AGENT_UNIT)
            return
        self._set(state=Phase.DONE, finished=time.time(), detail=detail)

    # --- reboot ---------------------------------------------------------------------------
    async def _reboot(self, version: str) -> None:
        await reboot_into(self, version, self.vms)

    def settle_boot(self) -> None:
        """How a reboot-mode upgrade ended, decided before the API answers anyone."""
        self._restore = settle_boot(self, self._version())

    async def after_boot(self) -> None:
        """Restore the VMs a reboot-mode upgrade stopped (once the network is up)."""
        await restore_vms(self._restore, self.vms)
        self._restore = []

    def boot_status(self) -> dict[str, Any]:
        """A fallback is remembered in the persisted status until the next upgrade."""
        fell_back = self.status.state is Phase.FAILED and self.status.detail == "fallback"
        return {"fallback": fell_back, "reason": self.status.error if fell_back else None}

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # the reboot module needs these
    @property
    def images(self) -> ImageSource:
        assert self._images is not None
        return self._images

    @property
    def state_dir(self) -> Path:
        return self._file.parent

    def set_status(self, **changes: Any) -> None:
        self._set(**changes)
