"""The wire schema shared by the agent, the CLI and the rollout: what the agent writes reads
back the same, and answers from other versions (or from anything) never crash a reader."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hatchery.wire import (
    BootStatus,
    Health,
    Mode,
    Phase,
    UpgradeRequest,
    UpgradeStatus,
    VmOutcome,
    VmResult,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "version": json_values | st.just("v2"),
        "checks": json_values,
        "vms": json_values,
        "upgrade": json_values,
        "boot": json_values,
        "healthy": json_values,
        "uptime": json_values,
    },
)


upgrade_documents = st.fixed_dictionaries(
    {"state": st.just("done")},
    optional={"vms": json_values | st.lists(st.fixed_dictionaries(
        {}, optional={"name": json_values, "result": json_values | st.sampled_from(
            [r.value for r in VmResult]), "pause_seconds": json_values, "reason": json_values},
    ), max_size=4)},
)  # fmt: skip


@given(upgrade_documents | json_values)
def test_a_vm_report_never_crashes_a_reader(doc: Any) -> None:
    status = UpgradeStatus.from_json(doc)
    assert all(isinstance(vm.name, str) and isinstance(vm.result, VmResult) for vm in status.vms)
    assert UpgradeStatus.from_json(status.to_json()) == status


@given(documents | json_values)
def test_reading_never_crashes(doc: Any) -> None:
    UpgradeStatus.from_json(doc)
    BootStatus.from_json(doc)
    try:
        health = Health.from_json(doc)
    except ValueError:
        return
    assert isinstance(health.version, str)
    assert all(isinstance(n, str) for n in health.failing())
    assert Health.from_json(health.to_json()) == health


def test_the_contract_of_docs_api_md() -> None:
    health = Health.from_json(
        {
            "version": "v2",
            "healthy": False,
            "checks": {"agent": "ok", "units": "fail: x.service", "vms": "ok"},
            "vms": {"total": 3, "running": 2, "stopped": 1, "crashed": 0},
            "upgrade": {"state": "done", "target": "v2", "mode": "live", "error": None,
                        "started": 10, "finished": 12.5, "detail": "1 replace"},
            "boot": {"fallback": True, "reason": "not marked good"},
            "uptime": 3.5,
        }
    )  # fmt: skip
    assert health.failing() == ("units",)
    assert health.detail(("units",)) == "units: fail: x.service"
    assert health.vms_total == 3 and health.boot == BootStatus(True, "not marked good")
    assert health.upgrade == UpgradeStatus(Phase.DONE, "v2", Mode.LIVE, None, 10.0, 12.5,
                                           "1 replace")  # fmt: skip
    assert health.uptime == 3.5


def test_the_vm_report_of_docs_api_md() -> None:
    status = UpgradeStatus.from_json(
        {"state": "done", "target": "v3", "mode": "reboot", "detail": "rebooted into v3",
         "vms": [
             {"name": "web1", "result": "resumed", "pause_seconds": 41.2, "reason": None},
             {"name": "db1", "result": "cold-started", "pause_seconds": None,
              "reason": "resume failed: its state file is missing; cold-started"},
             {"name": "old", "result": "failed", "reason": "no such disk"},
             {"name": "gone", "result": "stopped", "reason": "it no longer exists"},
             {"name": "next", "result": "restoring"},
         ]}
    )  # fmt: skip
    assert [(vm.name, vm.result) for vm in status.vms] == [
        ("web1", VmResult.RESUMED), ("db1", VmResult.COLD_STARTED), ("old", VmResult.FAILED),
        ("gone", VmResult.STOPPED), ("next", VmResult.RESTORING),
    ]  # fmt: skip
    assert status.vms[0].pause_seconds == 41.2 and not status.vms[0].degraded
    assert [vm.degraded for vm in status.vms[1:]] == [True, True, True, False]
    assert status.restoring


def test_a_vm_report_reads_back_the_same_and_tolerates_what_it_does_not_know() -> None:
    status = UpgradeStatus(Phase.DONE, "v3", Mode.REBOOT, vms=(
        VmOutcome("web1", VmResult.RESUMED, pause_seconds=3.0),
        VmOutcome("db1", VmResult.COLD_STARTED, reason="resume failed: x; cold-started"),
    ))  # fmt: skip
    assert UpgradeStatus.from_json(status.to_json()) == status
    health = Health("v3", upgrade=status)
    assert Health.from_json(health.to_json()).upgrade.vms == status.vms
    # An older agent sends no report; a newer one may send results this side does not know,
    # or odd values: those entries are left out, the rest is read.
    assert UpgradeStatus.from_json({"state": "done"}).vms == ()
    odd = {"state": "done", "vms": [
        {"name": "a", "result": "teleported"}, {"result": "resumed"}, "web1", 3,
        {"name": "b", "result": "resumed", "pause_seconds": -1},
        {"name": "c", "result": "resumed", "pause_seconds": True, "reason": 5},
    ]}  # fmt: skip
    assert UpgradeStatus.from_json(odd).vms == (
        VmOutcome("b", VmResult.RESUMED), VmOutcome("c", VmResult.RESUMED),
    )  # fmt: skip
    assert UpgradeStatus.from_json({"state": "done", "vms": {"a": "resumed"}}).vms == ()


def test_what_the_agent_writes_reads_back_the_same() -> None:
    status = UpgradeStatus(Phase.FAILED, "v3", Mode.REBOOT, "fell back to v2: x", 1.0, 2.0,
                           "fallback")  # fmt: skip
    assert UpgradeStatus.from_json(status.to_json()) == status
    health = Health("v2", True, {"agent": "ok"}, {"total": 0}, status, BootStatus(True, "x"), 1.5)
    assert Health.from_json(health.to_json()) == health


def test_newer_and_older_agents_are_understood() -> None:
    newer = {"state": "paused", "target": "v3", "mode": "teleport", "phase_eta": 4}
    assert UpgradeStatus.from_json(newer) == UpgradeStatus(Phase.IDLE, target="v3", mode=None)
    older = {"version": "v1", "healthy": True, "checks": {"agent": "ok"}}  # no upgrade, no boot
    health = Health.from_json(older)
    assert health.upgrade == UpgradeStatus() and health.boot == BootStatus()
    assert health.vms_total is None and health.failing() == ()


@pytest.mark.parametrize("doc", [None, [], "v2", {"healthy": True}, {"version": 2}])
def test_no_version_is_no_health_answer(doc: Any) -> None:
    with pytest.raises(ValueError, match="no version"):
        Health.from_json(doc)


def test_an_upgrade_request_sends_optional_fields_only_when_set() -> None:
    # An older agent refuses fields it does not know: a plain request must stay plain.
    assert UpgradeRequest("v2").to_json() == {"version": "v2", "mode": "live"}
    full = UpgradeRequest("v1", Mode.REBOOT, guard_seconds=90, allow_downgrade=True)
    assert full.to_json() == {"version": "v1", "mode": "reboot", "guard_seconds": 90,
                              "allow_downgrade": True}  # fmt: skip
