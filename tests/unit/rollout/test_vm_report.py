"""The rollout's summary of a reboot's per-VM report, and journals with and without it."""

from __future__ import annotations

from pathlib import Path

from hatchery.wire import Mode, Phase, UpgradeStatus, VmOutcome, VmResult
from hatchery_rollout.executor import ExecOptions
from hatchery_rollout.journal import HostState, Journal, read_journal
from hatchery_rollout.vmreport import REASON_LIMIT, VmTally, tally

START = {"version": "v2", "waves": [["a", "b"]], "hosts": [], "options": {}}


def status(*vms: VmOutcome) -> UpgradeStatus:
    return UpgradeStatus(Phase.DONE, "v2", Mode.REBOOT, vms=vms)


def test_resumed_vms_are_counted_with_the_longest_pause() -> None:
    report = status(VmOutcome("a", VmResult.RESUMED, 2.0), VmOutcome("b", VmResult.RESUMED, 3.5))
    assert tally(report) == VmTally(resumed=2, max_pause=3.5)


def test_a_vm_not_resumed_makes_the_host_degraded() -> None:
    report = status(
        VmOutcome("a", VmResult.RESUMED, 2.0),
        VmOutcome("b", VmResult.COLD_STARTED, reason="resume failed: x; cold-started"),
        VmOutcome("c", VmResult.FAILED, reason="no such disk"),
        VmOutcome("d", VmResult.STOPPED),
    )
    assert tally(report) == VmTally(
        resumed=1, cold_started=1, not_restored=2, max_pause=2.0,
        degraded="vm b cold-started: resume failed: x; cold-started; vm c failed: no such disk; "
        "vm d stopped: no reason given",
    )  # fmt: skip
    many = status(*(VmOutcome(f"vm{i}", VmResult.COLD_STARTED, reason="x" * 50) for i in range(20)))
    summary = tally(many)
    assert summary is not None and summary.degraded is not None
    assert len(summary.degraded) == REASON_LIMIT and summary.degraded.endswith("…")


def test_no_report_is_no_tally() -> None:
    """A live patch, a node without VMs, or an agent older than the report."""
    assert tally(UpgradeStatus(Phase.DONE, "v2", Mode.LIVE)) is None


async def test_the_journal_keeps_the_tally_and_reads_journals_from_before_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, START)
    cold = VmTally(resumed=1, cold_started=1, max_pause=4.0, degraded="vm b cold-started: x")
    await journal.host("a", HostState.DONE, **cold.fields())
    await journal.host("b", HostState.DONE)  # as an older rollout (or a live patch) wrote it
    await journal.aclose()
    state = read_journal(path)
    assert state.hosts["a"].vms == cold and state.hosts["b"].vms is None
    assert state.degraded() == [("a", "vm b cold-started: x")]
    # An older journal's options: no halt on degraded hosts.
    assert ExecOptions.from_json("v2", {"mode": "reboot"}).halt_on_degraded is False
    both = ExecOptions("v2", Mode.REBOOT, halt_on_degraded=True)
    assert ExecOptions.from_json("v2", both.to_json()).halt_on_degraded is True
