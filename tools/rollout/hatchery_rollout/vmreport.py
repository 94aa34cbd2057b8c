"""What an upgrade did to a host's VMs, as the rollout records it: a pure summary of the
agent's per-VM report (``UpgradeStatus.vms`` in the wire schema), after a reboot or a live
patch with ``--refresh-vms``.

A host is *degraded* when a VM that ran before the upgrade did not come back with its memory:
cold-started (the guest rebooted), or stopped or failed (not running); or, after a live patch,
when a VM's refresh failed (it runs on the old QEMU binary). Whether that halts
the rollout is the operator's policy (``--halt-on-degraded``); the executor decides, this
module only counts. An agent older than the report sends none: nothing to count, not
degraded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hatchery.wire import UpgradeStatus, VmResult

REASON_LIMIT = 300  # characters of the degraded reason kept in the journal and the table


@dataclass(frozen=True, slots=True)
class VmTally:
    """Per host: VMs resumed, cold-started, not running (stopped or failed), refreshed and
    left on the old QEMU (refresh failed), the longest pause of a resumed or refreshed one,
    and why the host is degraded (None: it is not)."""

    resumed: int = 0
    cold_started: int = 0
    not_restored: int = 0
    max_pause: float | None = None
    degraded: str | None = None
    refreshed: int = 0
    refresh_failed: int = 0

    def fields(self) -> dict[str, Any]:
        """The journal's fields for this host (added to its ``done`` or ``failed`` record)."""
        out: dict[str, Any] = {
            "resumed": self.resumed,
            "cold_started": self.cold_started,
            "not_restored": self.not_restored,
            "max_pause": self.max_pause,
        }
        if self.refreshed or self.refresh_failed:
            out.update(refreshed=self.refreshed, refresh_failed=self.refresh_failed)
        if self.degraded is not None:
            out["degraded"] = self.degraded
        return out


def tally(status: UpgradeStatus) -> VmTally | None:
    """The summary of ``status``'s VM report; None when it has none (a live patch without
    ``refresh_vms``, no VMs, or an agent older than the report)."""
    if not status.vms:
        return None
    resumed = [vm for vm in status.vms if vm.result is VmResult.RESUMED]
    cold = [vm for vm in status.vms if vm.result is VmResult.COLD_STARTED]
    refreshed = [vm for vm in status.vms if vm.result is VmResult.REFRESHED]
    stale = [vm for vm in status.vms if vm.result is VmResult.REFRESH_FAILED]
    pauses = [vm.pause_seconds for vm in (*resumed, *refreshed) if vm.pause_seconds is not None]
    hurt = [vm for vm in status.vms if vm.degraded]
    why = "; ".join(f"vm {vm.name} {vm.result.value}: {vm.reason or 'no reason given'}"
                    for vm in hurt)  # fmt: skip
    if len(why) > REASON_LIMIT:
        why = why[: REASON_LIMIT - 1] + "…"
    return VmTally(
        resumed=len(resumed),
        cold_started=len(cold),
        not_restored=len(hurt) - len(cold) - len(stale),
        max_pause=max(pauses) if pauses else None,
        degraded=why or None,
        refreshed=len(refreshed),
        refresh_failed=len(stale),
    )
