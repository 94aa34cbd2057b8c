from __future__ import annotations

import pytest

from hatchery.capacity import CapacityError, HostCapacity, Resources
from hatchery.vms.model import (
    TRANSITIONS,
    Action,
    Event,
    KernelBoot,
    VmRecord,
    VmState,
    VmStateError,
    check_action,
    next_state,
)


@pytest.mark.parametrize(
    ("state", "action", "expected"),
    [
        (VmState.STOPPED, Action.START, VmState.STARTING),
        (VmState.CRASHED, Action.START, VmState.STARTING),
        (VmState.RUNNING, Action.STOP, VmState.STOPPING),
        (VmState.RUNNING, Action.DESTROY, VmState.DESTROYING),
        (VmState.STOPPED, Action.DESTROY, VmState.DESTROYING),
        (VmState.DESTROYING, Action.DESTROY, VmState.DESTROYING),  # QEMU did not exit: again
    ],
)
def test_allowed_actions(state: VmState, action: Action, expected: VmState) -> None:
    assert check_action("web1", state, action) is expected


@pytest.mark.parametrize(
    ("state", "action"),
    [
        (VmState.STOPPING, Action.START),
        (VmState.RUNNING, Action.START),
        (VmState.STOPPED, Action.STOP),
        (VmState.DESTROYING, Action.START),
        (VmState.STOPPING, Action.DESTROY),
        (VmState.CREATING, Action.START),  # its sources are still being fetched
        (VmState.CREATING, Action.STOP),
        (VmState.CREATING, Action.DESTROY),
    ],
)
def test_refused_actions_say_why(state: VmState, action: Action) -> None:
    with pytest.raises(VmStateError, match=f"vm web1 is {state}, cannot {action} it"):
        check_action("web1", state, action)


def test_every_state_is_reachable_and_can_end() -> None:
    reachable = {VmState.CREATING}  # every VM starts there
    frontier = [VmState.CREATING]
    while frontier:
        current = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is current and dst not in reachable:
                reachable.add(dst)
                frontier.append(dst)
    assert reachable == set(VmState)
    for state in set(VmState) - {VmState.DESTROYING}:
        assert any(src is state for src, _ in TRANSITIONS), f"{state} is a dead end"


def test_qemu_dying_while_running_is_a_crash_but_not_while_stopping() -> None:
    assert next_state("a", VmState.RUNNING, Event.DIED) is VmState.CRASHED
    assert next_state("a", VmState.STOPPING, Event.DIED) is VmState.STOPPED
    assert next_state("a", VmState.RUNNING, Event.STOPPED) is VmState.STOPPED


def test_record_round_trip() -> None:
    vm = VmRecord(
        name="a", uuid="u", state=VmState.RUNNING, vcpus=1, memory_mib=128, disk_mib=0,
        bridge="br0", ip="10.0.0.2", mac="52:54:0a:00:00:02",
        kernel_boot=KernelBoot("/k", "/i", "console=ttyS0"), labels={"role": "web"},
    )  # fmt: skip
    assert VmRecord.from_json(vm.to_json()) == vm


def test_capacity_names_what_is_short() -> None:
    cap = HostCapacity(vcpus=4, memory_mib=1000, disk_mib=100)
    cap.check(Resources(2, 500, 0), Resources(2, 500, 100))
    with pytest.raises(CapacityError) as err:
        cap.check(Resources(3, 900, 50), Resources(2, 200, 10))
    assert "vCPUs: 2 asked, 1 free" in err.value.message
    assert "memory: 200 MiB asked, 100 MiB free" in err.value.message
    assert "disk" not in err.value.message


@pytest.mark.parametrize(
    ("state", "action", "expected"),
    [
        (VmState.RUNNING, Action.REFRESH, VmState.REFRESHING),
        (VmState.RUNNING, Action.SUSPEND, VmState.SUSPENDING),
        (VmState.PAUSED, Action.SUSPEND, VmState.SUSPENDING),
        (VmState.SUSPENDED, Action.DESTROY, VmState.DESTROYING),
    ],
)
def test_refresh_and_suspend_allowed(state: VmState, action: Action, expected: VmState) -> None:
    assert check_action("web1", state, action) is expected


@pytest.mark.parametrize(
    ("state", "action"),
    [
        (VmState.STOPPED, Action.REFRESH),  # no QEMU to move the guest from
        (VmState.PAUSED, Action.REFRESH),  # the new QEMU would start it
        (VmState.REFRESHING, Action.REFRESH),
        (VmState.REFRESHING, Action.STOP),  # wait until it has moved
        (VmState.REFRESHING, Action.DESTROY),
        (VmState.SUSPENDING, Action.STOP),
        (VmState.SUSPENDED, Action.SUSPEND),
        (VmState.SUSPENDED, Action.STOP),  # nothing runs; destroy or start (resume) it
        (VmState.STOPPED, Action.SUSPEND),
    ],
)
def test_refresh_and_suspend_refused(state: VmState, action: Action) -> None:
    with pytest.raises(VmStateError, match=f"vm web1 is {state}, cannot {action} it"):
        check_action("web1", state, action)


def test_refresh_and_suspend_outcomes() -> None:
    """Either way the guest ends in one running QEMU, or is crashed if it vanished; a
    resume that cannot load its file is a start that failed (then a cold start)."""
    assert next_state("v", VmState.REFRESHING, Event.REFRESHED) is VmState.RUNNING
    assert next_state("v", VmState.REFRESHING, Event.REFRESH_FAILED) is VmState.RUNNING
    assert next_state("v", VmState.REFRESHING, Event.DIED) is VmState.CRASHED
    assert next_state("v", VmState.SUSPENDING, Event.SUSPENDED) is VmState.SUSPENDED
    assert next_state("v", VmState.SUSPENDING, Event.SUSPEND_FAILED) is VmState.RUNNING
    assert next_state("v", VmState.SUSPENDING, Event.DIED) is VmState.CRASHED
    assert next_state("v", VmState.SUSPENDED, Event.RESUME_REQUESTED) is VmState.STARTING
    assert next_state("v", VmState.STARTING, Event.START_FAILED) is VmState.STOPPED
    # QMP events from a moving guest change nothing
    for state in (VmState.REFRESHING, VmState.SUSPENDING, VmState.SUSPENDED):
        for event in (Event.PAUSED, Event.RESUMED):
            assert (state, event) not in TRANSITIONS


def test_suspended_record_round_trip() -> None:
    vm = VmRecord(name="s", uuid="u", state=VmState.SUSPENDED, vcpus=1, memory_mib=64,
                  disk_mib=0, bridge="br0", ip="10.0.0.2", mac="52:54:00:00:00:02",
                  machine="pc-q35-7.2", state_file="/data/vms/s/suspend.state",
                  suspended_at=12.5, pause_seconds=None)  # fmt: skip
    assert VmRecord.from_json(vm.to_json()) == vm
    new_fields = ("state_file", "suspended_at", "pause_seconds", "incoming_pid")
    older = {k: v for k, v in vm.to_json().items() if k not in new_fields}
    assert VmRecord.from_json(older).state_file is None  # an older agent's record still loads
