"""``hatchery health`` shows the latest upgrade and, after a reboot, what became of each VM."""

from __future__ import annotations

from hatchery.cli.vm import upgrade_lines
from hatchery.wire import Mode, Phase, UpgradeStatus, VmOutcome, VmResult


def test_a_reboot_shows_each_vm() -> None:
    status = UpgradeStatus(Phase.DONE, "v3", Mode.REBOOT, detail="rebooted into v3", vms=(
        VmOutcome("web1", VmResult.RESUMED, pause_seconds=41.25),
        VmOutcome("db1", VmResult.COLD_STARTED, reason="resume failed: x; cold-started"),
        VmOutcome("next", VmResult.RESTORING),
    ))  # fmt: skip
    assert upgrade_lines(status) == [
        "upgrade to v3 (reboot): done: rebooted into v3",
        "  vm web1: resumed after a 41.2s pause",
        "  vm db1: cold-started: resume failed: x; cold-started",
        "  vm next: restoring",
    ]


def test_no_upgrade_no_lines_and_a_failure_says_why() -> None:
    assert upgrade_lines(UpgradeStatus()) == []
    failed = UpgradeStatus(Phase.FAILED, "v4", Mode.REBOOT, error="fell back to v3: x")
    assert upgrade_lines(failed) == ["upgrade to v4 (reboot): failed: fell back to v3: x"]
