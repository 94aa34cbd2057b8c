"""The upgrade's model: its status and how it changes, and what it needs from the node.

The status types are the wire schema's (``hatchery.wire``: the agent persists the status in
the form it serves). Its lifecycle::

    idle ──request──► running ──► done | failed ──request──► running …

``running`` clears what the previous upgrade left; ``note`` records progress while it runs.
Only the controller records a status; the live patch and the reboot steps return what
happened (``LiveOutcome``, ``BootOutcome``) instead of writing it themselves.

The upgrade declares what it needs from its collaborators as Protocols (``ImageSource`` from
the image store, ``VmControl`` from the VM manager), so tests pass small real fakes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Protocol

from hatchery.wire import BootStatus, Mode, Phase, UpgradeStatus, VmOutcome, VmResult

__all__ = [
    "FALLBACK",
    "BootOutcome",
    "BootStatus",
    "ImageSource",
    "LiveOutcome",
    "Mode",
    "Phase",
    "UpgradeStatus",
    "VmControl",
    "VmOutcome",
    "VmResult",
    "boot_status",
    "done",
    "failed",
    "note",
    "restored",
    "restoring",
    "running",
    "unfinished",
]


class ImageSource(Protocol):
    """What upgrades need from the image store."""

    def has(self, version: str) -> bool:
        """Whether the store holds image ``version`` (False, not an error, when unreadable)."""
        ...

    def verify(self, version: str) -> None:
        """Check the image again before it is used: its manifest against the keys trusted
        *now*, and every artefact's content against the sha256 the manifest signs.

        :raise HatcheryError: it does not verify (the message says which part and why).
        """
        ...

    def open_artefact(self, version: str, role: str) -> AbstractContextManager[BinaryIO]:
        """The artefact's bytes as built (``initrd``: the root, zstd-compressed cpio); checked
        against what was signed before it is opened (a file the store keeps as built, see
        ``checked_file``) or while it is read (a reader that reaches the end has read exactly
        what was signed, or gets an error).

        :raise HatcheryError: the image has no such artefact, its manifest is not trusted,
            or the store cannot read it.
        """
        ...

    def checked_file(self, version: str, role: str) -> Path | None:
        """The artefact as a file that holds exactly its bytes as built, checked against what
        the manifest signs, when the store keeps it so (None: read it with
        ``open_artefact``). Reboot staging links it instead of copying 100 MB.

        :raise HatcheryError: the manifest is not trusted, or the file does not verify.
        """
        ...

    def artefact_digest(self, version: str, role: str) -> str | None:
        """The artefact's sha256 as signed, None if the image has none of that role.

        :raise HatcheryError: the manifest is not trusted (any more).
        """
        ...

    def set_current(self, version: str) -> None:
        """Record ``version`` as the one the node runs."""
        ...


class VmControl(Protocol):
    """What an upgrade needs from the VM manager: a reboot saves and restores its VMs, a
    live patch with ``refresh_vms`` refreshes them."""

    def running_names(self) -> list[str]:
        """The VMs to stop before the reboot and to restore after it, or to refresh."""
        ...

    async def refresh_for_upgrade(self, name: str) -> VmOutcome:
        """Move ``name`` to a new QEMU process of the node's binary (``vm refresh``); what
        became of it: refreshed (with its pause) or refresh-failed (with why; it runs on in
        its old QEMU), stopped if it no longer runs.

        :raise HatcheryError: an unexpected failure (reported ``refresh-failed`` by the
            caller, the others go on).
        """
        ...

    async def stop_for_reboot(self, name: str) -> None:
        """Stop ``name`` softly, keeping it to be restored."""
        ...

    async def suspend_for_reboot(self, name: str) -> None:
        """Save ``name``'s whole state to /data and quit its QEMU (``restore`` resumes it);
        stop it softly if that fails."""
        ...

    def memory_mib(self, names: list[str]) -> int:
        """What saving ``names`` takes on /data at most: their guest memory."""
        ...

    async def restore(self, name: str) -> VmOutcome:
        """Start ``name`` again after the reboot; what became of it: resumed (with its
        pause), cold-started or left stopped (with the reason).

        :raise HatcheryError: it cannot be started (reported ``failed`` by the caller, the
            others go on).
        """
        ...


@dataclass(frozen=True, slots=True)
class LiveOutcome:
    """What a live patch did: ``detail`` for the status, and whether the agent's own unit is
    among those to restart (the controller then records the detail and restarts it last)."""

    detail: str
    restart_agent: bool = False


@dataclass(frozen=True, slots=True)
class BootOutcome:
    """How a reboot-mode upgrade ended, as the agent that came up afterwards finds it.

    ``version`` is the target, ``running`` what this boot runs; if they differ the node fell
    back (the boot guard, or another boot) and ``reason`` says why. ``restore`` names the VMs
    stopped for the reboot.
    """

    version: str
    previous: str
    running: str
    restore: tuple[str, ...] = ()
    reason: str | None = None

    @property
    def booted(self) -> bool:
        """Whether the node runs the version the upgrade aimed at."""
        return self.running == self.version


# --- the status's lifecycle ---------------------------------------------------------------------
def running(target: str, mode: Mode, now: float) -> UpgradeStatus:
    """A new upgrade under way; nothing of the previous one is kept."""
    return UpgradeStatus(Phase.RUNNING, target=target, mode=mode, started=now)


def note(status: UpgradeStatus, detail: str) -> UpgradeStatus:
    """Progress of the running upgrade (``staged v3; stopping 2 VMs, then kexec``)."""
    return replace(status, detail=detail)


def done(
    status: UpgradeStatus, now: float, detail: str, *, target: str | None = None
) -> UpgradeStatus:
    """The upgrade (to ``target``, default the status's) succeeded."""
    return replace(status, state=Phase.DONE, target=target or status.target, error=None,
                   finished=now, detail=detail)  # fmt: skip


def failed(
    status: UpgradeStatus,
    now: float,
    error: str,
    *,
    target: str | None = None,
    detail: str | None = None,
) -> UpgradeStatus:
    """The upgrade failed because of ``error``; ``detail`` (default: kept) says how far it got
    or, for a reboot, ``fallback``."""
    kept = detail if detail is not None else status.detail
    return replace(status, state=Phase.FAILED, target=target or status.target, error=error,
                   finished=now, detail=kept)  # fmt: skip


def restoring(status: UpgradeStatus, names: tuple[str, ...]) -> UpgradeStatus:
    """The report of a reboot's VMs, before the agent of the new boot has brought them back:
    each ``restoring`` (a reader waits for the final word)."""
    return replace(status, vms=tuple(VmOutcome(n, VmResult.RESTORING) for n in names))


def restored(status: UpgradeStatus, outcome: VmOutcome) -> UpgradeStatus:
    """The report with ``outcome`` in its VM's place (appended if it was not listed: a live
    patch's refreshed VMs are added one by one)."""
    listed = any(vm.name == outcome.name for vm in status.vms)
    vms = tuple(outcome if vm.name == outcome.name else vm for vm in status.vms)
    return replace(status, vms=vms if listed else (*vms, outcome))


def unfinished(status: UpgradeStatus, why: str) -> UpgradeStatus:
    """A report the previous agent left ``restoring`` (it stopped before bringing the VMs
    back): those VMs are ``failed``, ``why`` the reason, so no reader waits for ever."""
    vms = tuple(
        VmOutcome(vm.name, VmResult.FAILED, reason=why) if vm.result is VmResult.RESTORING else vm
        for vm in status.vms
    )
    return replace(status, vms=vms)


FALLBACK = "fallback"
"""The ``detail`` of a reboot-mode upgrade whose node booted back into its previous version."""


def boot_status(status: UpgradeStatus) -> BootStatus:
    """A fallback is remembered in the persisted status until the next upgrade."""
    fell_back = status.state is Phase.FAILED and status.detail == FALLBACK
    return BootStatus(fallback=fell_back, reason=status.error if fell_back else None)
