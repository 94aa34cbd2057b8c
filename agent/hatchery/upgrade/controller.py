"""The node's upgrade controller: the state behind ``POST /v1/upgrade`` and ``/healthz``.

One upgrade at a time, its status persisted (``upgrade.json``, the wire form) so that a
restarted agent — the live patch restarts it last, a reboot starts a new one — reports how it
ended. Live mode patches the running root (see ``livepatch``); reboot mode stages the new
kernel and root under the state folder and kexecs into them (see ``reboot``).

The controller is the only writer of the status (``model`` has its lifecycle); the steps
return what happened. Nothing slow runs on the event loop: reading image archives, patching,
staging, kexec and the status file's fsync go to worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import platform
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from hatchery import host, state
from hatchery.errors import HatcheryError
from hatchery.health import read_version
from hatchery.images.manifest import compare_versions
from hatchery.metrics import Metrics, UpgradeMeter
from hatchery.upgrade import livepatch, model, reboot
from hatchery.upgrade.archive import (
    ArchiveError,
    check_readable,
    has_modules,
    index_root,
    open_root,
)
from hatchery.upgrade.fingerprint import Fingerprint
from hatchery.upgrade.livepatch import LivePatch, Recovery, units_to_restart
from hatchery.upgrade.model import (
    BootStatus,
    ImageSource,
    LiveOutcome,
    Mode,
    Phase,
    UpgradeStatus,
    VmControl,
    VmOutcome,
    VmResult,
)

log = logging.getLogger(__name__)


SUSPEND_HEADROOM = 256 << 20  # beyond the VMs' memory: the staged kernel and initrd, logs
#: VMs brought back at once after a reboot upgrade. Each restore is mostly waiting (QEMU
#: starting, its state read from /data, the guest resumed): one after the other, the last
#: VM's pause held every other VM's restore too. Bounded, so a host of fifty VMs does not
#: start fifty QEMUs reading fifty files at the same moment.
RESTORE_CONCURRENCY = 4


class UpgradeError(HatcheryError):
    """An upgrade request that cannot be carried out; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class Upgrader:
    """Runs a node's upgrades; built once by the agent with everything it needs.

    ``images`` is the store (None: upgrades are refused), ``root`` the running root (``/``;
    a folder in tests), ``vms`` what a reboot stops and restores (None: no VMs to care for),
    ``version`` tells the running image's version (default: ``root``'s os-release),
    ``guard_seconds`` the boot guard's default time for a reboot-mode upgrade, ``kexec`` how a
    reboot leaves for the staged kernel (``reboot.HOST_KEXEC``; a stand-in in tests).
    """

    def __init__(
        self,
        state_dir: Path,
        images: ImageSource | None,
        root: Path = Path("/"),
        *,
        vms: VmControl | None = None,
        version: Callable[[], str] | None = None,
        kernel_release: str | None = None,
        guard_seconds: int = reboot.GUARD_SECONDS,
        kexec: reboot.Kexec = reboot.HOST_KEXEC,
        meter: UpgradeMeter | None = None,
    ) -> None:
        self._state_dir = state_dir
        self._meter = meter or Metrics().upgrade()
        self._file = state_dir / "upgrade.json"
        self._images = images
        self._root = root
        self._vms = vms
        self._version = version or (lambda: read_version(root / "usr/lib/os-release"))
        self._release = kernel_release or platform.release()
        self._guard_seconds = guard_seconds
        self._kexec = kexec
        self._task: asyncio.Task[None] | None = None
        self._restore: tuple[str, ...] = ()
        self._handing_over = False  # our own end (restart, kexec) was asked for: not a failure
        self._request_lock = asyncio.Lock()
        self._report_lock = asyncio.Lock()  # one VM outcome at a time into the status
        self._file_lock = threading.Lock()
        self._sequence = 0  # of status writes: an older one never overwrites a newer one
        self._written = 0
        self._status = UpgradeStatus()
        self._status = self._resume(UpgradeStatus.from_json(state.read_json(self._file)))

    def _resume(self, status: UpgradeStatus) -> UpgradeStatus:
        """An upgrade the previous agent left running: a live patch restarts the agent last,
        so the new agent tells how it ended; a reboot's end is ``settle_boot``'s to tell once
        the guard was armed, and a failure if the agent stopped before that.

        A live patch the previous agent did not finish (its work folder is still in the
        root) is settled first, whatever the status file says: finished if every step is in
        place, else rolled back; the status then says which (never ``done`` half-applied).
        """
        try:
            recovery = livepatch.recover(self._root)
        except OSError as exc:
            log.error("cannot settle the interrupted live patch: %s", exc)
            why = f"an interrupted live patch could not be rolled back: {exc}"
            ended = model.failed(status, time.time(), why)
            self._write(ended, self._next())
            return ended
        if recovery is not None:
            ended = self._recovered(status, recovery)
            self._write(ended, self._next())
            return ended
        if status.restoring:  # the previous agent stopped while it brought the VMs back
            settled = model.unfinished(status, "the agent stopped before it restored this VM")
            self._write(settled, self._next())
            return settled
        if status.state is not Phase.RUNNING:
            return status
        if status.mode is Mode.REBOOT:
            if reboot.armed(self._state_dir):
                return status
            ended = model.failed(status, time.time(), "the agent stopped before the reboot")
        elif self._version() == status.target:
            before = f"{status.detail}; " if status.detail else ""
            back = f"{before}the agent came back on {status.target}"
            ended = model.done(status, time.time(), back)
        else:
            ended = model.failed(status, time.time(), "the agent restarted during the patch")
        self._write(ended, self._next())
        return ended

    def _recovered(self, status: UpgradeStatus, recovery: Recovery) -> UpgradeStatus:
        """The status after ``recover`` settled an interrupted live patch (blocking: a
        finished patch still needs its units restarted and the store's pointer moved)."""
        now = time.time()
        target = status.target or recovery.target
        if status.state is not Phase.RUNNING or status.mode is not Mode.LIVE:
            status = model.running(target or "unknown", Mode.LIVE, now)
        running = self._version()
        if recovery.phase == "staging":
            why = f"the agent stopped while staging the live patch to {target}: nothing changed"
            return model.failed(status, now, why, target=target)
        if not recovery.completed:
            why = (f"the agent stopped during the live patch to {target}: rolled back "
                   f"({recovery.restored} steps undone); the node runs {running}")  # fmt: skip
            return model.failed(status, now, why, target=target)
        try:
            restarted = self._restart(recovery.changed, agent=False)
            if self._images is not None and target is not None:
                self._images.set_current(target)
        except HatcheryError as exc:
            why = f"the live patch to {target} was in place, but finishing it failed: {exc.message}"
            return model.failed(status, now, why, target=target)
        units = ", ".join(restarted) or "none"
        detail = (f"the agent stopped during the live patch to {target} after every file was "
                  f"in place: finished it; restarted: {units}")  # fmt: skip
        return model.done(status, now, detail, target=target)

    def _restart(self, changed: Iterable[str], *, agent: bool) -> list[str]:
        """Reload systemd and restart the units whose files changed (blocking); the agent's
        own only if ``agent`` (its caller restarts it last otherwise). Return all of them.

        :raise CommandError: systemctl failed.
        """
        units = units_to_restart(self._root, changed)
        host.systemctl("daemon-reload")
        others = [u for u in units if u != host.AGENT_UNIT or agent]
        if others:
            host.systemctl("try-restart", *others)
        return units

    # --- the status ---------------------------------------------------------------------------
    @property
    def status(self) -> UpgradeStatus:
        """The latest upgrade as recorded (on disk before it shows here)."""
        return self._status

    def boot_status(self) -> BootStatus:
        return model.boot_status(self._status)

    def running_version(self) -> str:
        return self._version()

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence

    def _write(self, status: UpgradeStatus, sequence: int) -> None:
        """Persist ``status`` unless a newer one is already on disk (blocking).

        :raise StateError: the file cannot be written.
        """
        with self._file_lock:
            if sequence <= self._written:
                return
            state.write_json(self._file, status.to_json())
            self._written = sequence

    async def _record(self, status: UpgradeStatus) -> None:
        """Persist ``status`` off the event loop, then show it.

        :raise StateError: the file cannot be written; the shown status is unchanged.
        """
        await asyncio.to_thread(self._write, status, self._next())
        self._show(status)

    def _record_now(self, status: UpgradeStatus) -> None:
        """``_record`` for start-up, before the API answers anyone."""
        self._write(status, self._next())
        self._show(status)

    def _show(self, status: UpgradeStatus) -> None:
        """``status`` is the node's now; an upgrade that ended is counted for /metrics."""
        ended = status.state in (Phase.DONE, Phase.FAILED)
        # a VM's outcome added to the report of an upgrade that ended is not another end
        other = dataclasses.replace(status, vms=()) != dataclasses.replace(self._status, vms=())
        if ended and other:
            self._meter.ended(status.mode.value if status.mode else "", status.state.value)
        self._status = status

    # --- requests -----------------------------------------------------------------------------
    async def request(
        self,
        version: str,
        mode: Mode,
        guard_seconds: int | None = None,
        *,
        allow_downgrade: bool = False,
        refresh_vms: bool = False,
    ) -> tuple[int, UpgradeStatus]:
        """Accept (202), report a no-op (200) or refuse an upgrade to ``version``.

        ``guard_seconds``: reboot mode only, how long the new version has to come up before
        the boot guard falls back to the running one (default: the constructor's). The same
        request while it runs is accepted again and starts nothing (idempotent per version).
        A version older than the running one (``compare_versions``) is refused unless
        ``allow_downgrade``. The image is re-verified first: its manifest against the keys
        trusted now, each artefact against its signed sha256. ``refresh_vms`` (live mode
        only): once the patch is in place, every running VM is moved to a new QEMU process
        (``refresh_all``), each one's outcome in the status's ``vms``.

        :raise UpgradeError: refused (its ``status`` is the HTTP status: 404 not in the store,
            409 another upgrade runs, this is no Hatchery image or a downgrade was not
            allowed, 422 the image no longer verifies, live mode cannot, or ``refresh_vms``
            was asked for a reboot).
        :raise StateError: the status cannot be persisted; nothing was started.
        """
        if refresh_vms and mode is not Mode.LIVE:
            raise UpgradeError("refresh_vms is for live mode: a reboot saves and resumes every "
                               "VM", 422)  # fmt: skip
        async with self._request_lock:
            running = self._version()
            if running == "dev":
                raise UpgradeError(
                    f"{self._root} does not run a Hatchery image (no IMAGE_VERSION in its "
                    "os-release): there is nothing to upgrade", 409,
                )  # fmt: skip
            if self._status.state is Phase.RUNNING:
                if self._status.target == version:
                    return 202, self._status  # the same upgrade is under way
                raise UpgradeError(
                    f"an upgrade to {self._status.target} is running; "
                    f"cannot start one to {version}", 409,
                )  # fmt: skip
            if version == running:
                detail = f"already running {version}: nothing to do"
                return 200, UpgradeStatus(Phase.DONE, target=version, mode=mode, detail=detail)
            if not allow_downgrade and compare_versions(version, running) < 0:
                raise UpgradeError(
                    f"image {version} is older than the running {running}: refusing a "
                    "downgrade", 409,
                    hint='send "allow_downgrade": true (hatchery-rollout --allow-downgrade) '
                    "to install it anyway",
                )  # fmt: skip
            await asyncio.to_thread(self._check, version, mode, running)
            await self._record(model.running(version, mode, time.time()))
            guard = guard_seconds or self._guard_seconds
            self._handing_over = False
            self._task = asyncio.create_task(
                self._run(version, mode, guard, refresh_vms), name=f"upgrade-{version}"
            )
            return 202, self._status

    def _check(self, version: str, mode: Mode, running: str) -> None:
        """The image is in the store and, for live mode, runs on this kernel (blocking: it
        reads the target's root).

        :raise UpgradeError: it is not.
        """
        if self._images is None or not self._images.has(version):
            raise UpgradeError(
                f"image {version} is not in this node's store", 404,
                hint="publish it (hatchery image publish) or fetch it from a peer first",
            )  # fmt: skip
        try:
            self._images.verify(version)
        except HatcheryError as exc:
            raise UpgradeError(f"image {version} cannot be used: {exc.message}", 422,
                               hint=exc.hint) from exc  # fmt: skip
        if mode is Mode.LIVE:
            self._check_same_kernel(self._images, running, version)
        else:
            self._check_room_for_vms()

    def _check_room_for_vms(self) -> None:
        """A reboot saves every running VM's memory to /data: refuse before anything stops
        if it cannot fit (with ``SUSPEND_HEADROOM`` left for the staged kernel and logs)."""
        if self._vms is None:
            return
        names = self._vms.running_names()
        need = (self._vms.memory_mib(names) << 20) + SUSPEND_HEADROOM if names else 0
        try:
            free = shutil.disk_usage(self._state_dir).free
        except OSError:
            return
        if need > free:
            raise UpgradeError(
                f"a reboot upgrade saves the memory of {len(names)} running VM(s) to /data: "
                f"{need / (1 << 30):.2f} GiB needed, {free / (1 << 30):.2f} GiB free",
                409,
                hint="free space on /data, or stop some VMs first (they are then cold-started)",
            )

    def _check_same_kernel(self, images: ImageSource, running: str, version: str) -> None:
        ours = self._running_digest(images, running)
        theirs = images.artefact_digest(version, "kernel")
        if ours is not None and theirs is not None and ours != theirs:
            raise UpgradeError(
                f"image {version} has another kernel than {running}: live patch cannot change "
                "the kernel", 422, hint="use --mode reboot",
            )  # fmt: skip
        try:
            with images.open_artefact(version, "initrd") as raw:
                if ours is not None and ours == theirs:
                    # The very kernel the node runs: its root was built with that kernel's
                    # modules. Only whether the root can be read is checked now (the patch
                    # reads what it needs); mounting a live root's 100 MB image to look for
                    # a folder costs an emulated node seconds.
                    check_readable(raw)
                    return
                if has_modules(raw, self._release, self._state_dir):
                    return
        except ArchiveError as exc:
            why = f"image {version}'s root cannot be read: {exc.message}"
            raise UpgradeError(why, 422) from exc
        raise UpgradeError(
            f"image {version} has no modules for the running kernel {self._release}: "
            "live patch cannot change the kernel", 422, hint="use --mode reboot",
        )  # fmt: skip

    @staticmethod
    def _running_digest(images: ImageSource, running: str) -> str | None:
        """The running image's kernel digest; None when the store lacks it or it no longer
        verifies (a retired key): the root's modules then decide alone."""
        if not images.has(running):
            return None
        try:
            return images.artefact_digest(running, "kernel")
        except HatcheryError as exc:
            log.warning("running image %s: %s", running, exc.message)
            return None

    async def _run(
        self, version: str, mode: Mode, guard_seconds: int, refresh_vms: bool = False
    ) -> None:
        """The upgrade's task: whatever ends it is recorded, except the agent's own end."""
        try:
            if mode is Mode.LIVE:
                await self._live(version, refresh_vms)
            else:
                await self._reboot(version, guard_seconds)
        except asyncio.CancelledError:
            if not self._handing_over:
                await self._record_failure("cancelled: the agent stopped")
            raise
        except Exception as exc:
            message = exc.message if isinstance(exc, HatcheryError) else repr(exc)
            log.error("upgrade to %s failed: %s", version, message)
            await self._record_failure(message)

    async def _record_failure(self, error: str) -> None:
        ended = model.failed(self._status, time.time(), error)
        try:
            await self._record(ended)
        except HatcheryError as exc:  # the API still tells, the file could not
            log.error("cannot record the upgrade's failure: %s", exc.message)
            self._show(ended)

    # --- live ---------------------------------------------------------------------------------
    async def _live(self, version: str, refresh_vms: bool = False) -> None:
        outcome = await asyncio.to_thread(self._patch, version)
        if refresh_vms:  # before the agent's own restart: the running agent holds the VMs
            await self._record(model.note(self._status, f"{outcome.detail}; refreshing VMs"))
            refreshed = await self.refresh_all()
            outcome = dataclasses.replace(outcome, detail=f"{outcome.detail}; {refreshed}")
        if not outcome.restart_agent:
            await self._record(model.done(self._status, time.time(), outcome.detail))
            return
        # Our own restart comes last; the new agent reads the file and reports done.
        await self._record(model.note(self._status, outcome.detail))
        self._handing_over = True
        await asyncio.to_thread(host.systemctl, "--no-block", "restart", host.AGENT_UNIT)

    def _patch(self, version: str) -> LiveOutcome:
        """Patch the running root to ``version`` and restart the units that changed, except
        the agent's own (blocking).

        :raise HatcheryError: the patch failed and was rolled back, or a restart failed.
        """
        assert self._images is not None
        running = self._version()
        current = self._current_index(self._images, running, self._state_dir)
        patch = LivePatch(self._root, current)
        with self._images.open_artefact(version, "initrd") as raw:
            plan = patch.stage(open_root(raw), scratch=self._state_dir)
        if not plan.changes:
            patch.commit()
            self._images.set_current(version)
            return LiveOutcome("no changes")
        patch.apply(plan, version=version)
        # The journal stays until the units are restarted and the store points at the new
        # version: a crash before that is finished by the next agent (``recover``).
        try:
            units = self._restart(plan.changed_paths, agent=False)
            log.info("live patch to %s applied (%s); restarted %s", version, plan.summary(),
                     ", ".join(units) or "nothing")  # fmt: skip
            self._images.set_current(version)
        finally:
            patch.commit()
        detail = f"{plan.summary()}; restarted: {', '.join(units) or 'none'}"
        return LiveOutcome(detail, host.AGENT_UNIT in units and host.systemd_running())

    @staticmethod
    def _current_index(
        images: ImageSource, running: str, scratch: Path
    ) -> dict[str, Fingerprint] | None:
        """The running image's fingerprints for the three-way patch; None (patch without
        deletions) when the store lacks it or it no longer verifies."""
        if not images.has(running):
            log.warning("running image %s is not in the store: patching without deletions",
                        running)  # fmt: skip
            return None
        try:
            images.verify(running)
            with images.open_artefact(running, "initrd") as raw:
                return index_root(open_root(raw), scratch)
        except HatcheryError as exc:
            log.warning("running image %s does not verify (%s): patching without deletions",
                        running, exc.message)  # fmt: skip
            return None

    # --- reboot -------------------------------------------------------------------------------
    async def _reboot(self, version: str, guard_seconds: int) -> None:
        assert self._images is not None
        restore = self._vms.running_names() if self._vms is not None else []
        started = time.monotonic()
        staged = await asyncio.to_thread(
            reboot.prepare, self._images, self._state_dir, version, self._version(), restore,
            guard_seconds,
        )  # fmt: skip
        log.info("reboot to %s: staged in %.1f s", version, time.monotonic() - started)
        # Loaded while the VMs still run: its seconds are not their pause. Where it does not
        # fit beside them (memory), it is loaded again once they are saved.
        await self._record(model.note(self._status, f"staged {version}; loading its kernel"))
        loaded = await asyncio.to_thread(self._kexec.load, staged)
        detail = f"staged {version}; saving {len(restore)} VMs to /data, then kexec"
        log.info("reboot to %s: saving %d VMs", version, len(restore))
        try:
            await self._record(model.note(self._status, detail))
            if self._vms is not None:
                for name in restore:
                    await self._vms.suspend_for_reboot(name)
            if not loaded:
                loaded = await asyncio.to_thread(self._kexec.load, staged)
        except BaseException:
            if loaded:  # no jump follows: a later kexec must not take this kernel
                self._kexec.unload()  # on the loop: ``kexec -u`` returns at once, and a
                # cancelled upgrade (the agent stopping) could not await a thread here
            raise
        self._handing_over = True  # the shutdown that follows is the plan
        try:
            await asyncio.to_thread(self._kexec.jump, loaded)
        except BaseException:
            self._handing_over = False
            raise

    def settle_boot(self) -> None:
        """How a reboot-mode upgrade ended, decided before the API answers anyone (blocking,
        at start-up). The VMs it stopped are restored by ``after_boot``.

        :raise StateError: the outcome cannot be recorded (it is settled again next start).
        """
        outcome = reboot.settle(self._state_dir, self._version())
        if outcome is None:
            return
        now = time.time()
        if outcome.booted:
            if self._images is not None:
                self._images.set_current(outcome.version)
            ended = model.done(self._status, now, f"rebooted into {outcome.version}",
                               target=outcome.version)  # fmt: skip
            log.info("booted into %s as planned; %d VMs to restore", outcome.version,
                     len(outcome.restore))  # fmt: skip
        else:
            ended = model.failed(self._status, now, f"fell back to {outcome.running}: "
                                 f"{outcome.reason}", target=outcome.version,
                                 detail=model.FALLBACK)  # fmt: skip
            log.error("upgrade to %s failed, running %s: %s", outcome.version,
                      outcome.running, outcome.reason)  # fmt: skip
        if self._vms is not None:  # each VM reported ``restoring`` until after_boot's word
            ended = model.restoring(ended, outcome.restore)
        self._record_now(ended)
        reboot.clear(self._state_dir)
        self._restore = outcome.restore

    async def after_boot(self) -> None:
        """Restore the VMs a reboot-mode upgrade stopped (once the node's network is up), up
        to ``RESTORE_CONCURRENCY`` at once; one that cannot be restored is logged and the
        others go on. What became of each is recorded in the status as soon as it is known
        (resumed, cold-started, stopped or failed, see ``wire.VmResult``)."""
        restore, self._restore = self._restore, ()
        if self._vms is None or not restore:
            return
        vms, slots = self._vms, asyncio.Semaphore(RESTORE_CONCURRENCY)

        async def bring_back(name: str) -> None:
            async with slots:
                try:
                    outcome = await vms.restore(name)
                except HatcheryError as exc:
                    log.error("cannot restore vm %s after the reboot: %s", name, exc.message)
                    outcome = VmOutcome(name, VmResult.FAILED, reason=exc.message)
                except Exception as exc:  # a bug in one VM's restore must not strand the rest
                    log.exception("restoring vm %s after the reboot crashed", name)
                    outcome = VmOutcome(name, VmResult.FAILED, reason=f"internal error: {exc!r}")
            await self._report(outcome)

        # In the order they were saved (the semaphore admits waiters first come, first
        # served); each reported as soon as it is known.
        await asyncio.gather(*(bring_back(name) for name in restore))

    async def _report(self, outcome: VmOutcome) -> None:
        """Record one VM's outcome in the upgrade's report (shown even if the file cannot
        be written: the API still tells). Serialised: concurrent restores each add theirs
        to the status the previous one left, none lost."""
        async with self._report_lock:
            reported = model.restored(self._status, outcome)
            try:
                await self._record(reported)
            except HatcheryError as exc:
                log.error("cannot record vm %s's outcome: %s", outcome.name, exc.message)
                self._show(reported)

    async def refresh_all(self) -> str:
        """Move every running VM to a new QEMU process of the node's binary, one at a time
        (a live patch may have replaced QEMU, its firmware or a library it maps: the agent
        cannot tell every file a QEMU process uses, and a needless refresh costs one pause
        of a fraction of a second). Each outcome is recorded in the status as soon as it is
        known: ``refreshed`` with its pause, or ``refresh-failed`` with why (the VM runs on
        in its old QEMU: a failed refresh never stops a guest). What it did, for the
        status's detail."""
        names = self._vms.running_names() if self._vms is not None else []
        if self._vms is None or not names:
            return "no VMs to refresh"
        moved = 0
        for name in names:
            try:
                outcome = await self._vms.refresh_for_upgrade(name)
            except HatcheryError as exc:
                log.error("cannot refresh vm %s after the live patch: %s", name, exc.message)
                outcome = VmOutcome(name, VmResult.REFRESH_FAILED, reason=exc.message)
            moved += outcome.result is VmResult.REFRESHED
            await self._report(outcome)
        left, detail = len(names) - moved, f"refreshed {moved} of {len(names)} VMs"
        return f"{detail} ({left} not: see vms)" if left else detail

    async def close(self) -> None:
        """Stop a running upgrade's task (idempotent); it records why, unless it was the
        agent's own planned end."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
