"""The VM lifecycle as an explicit state machine, and the record kept on disk per VM."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from hatchery.errors import HatcheryError
from hatchery.qemu.cmdline import DEFAULT_MACHINE

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}[a-z0-9]$|^[a-z0-9]$")


class VmState(StrEnum):
    CREATING = "creating"  # record, address and capacity held; sources being fetched
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    PAUSED = "paused"
    CRASHED = "crashed"
    DESTROYING = "destroying"
    # moving to a new QEMU process on this host (``vm refresh``): the old one runs the
    # guest until the new one has it; the record's ``incoming_pid`` names the new one
    REFRESHING = "refreshing"
    SUSPENDING = "suspending"  # paused, its state being saved to a file in its folder
    SUSPENDED = "suspended"  # no QEMU; ``state_file`` holds the guest (RAM and devices)


class Action(StrEnum):
    START = "start"
    STOP = "stop"
    DESTROY = "destroy"
    REFRESH = "refresh"
    SUSPEND = "suspend"


class Event(StrEnum):
    """What can happen to a VM, requested or not."""

    CREATED = "created"  # its sources are in its folder
    START_REQUESTED = "start requested"
    STARTED = "started"
    START_FAILED = "start failed"
    STOP_REQUESTED = "stop requested"
    STOPPED = "stopped"  # QEMU exited after a shutdown (guest poweroff or ours)
    DIED = "died"  # QEMU vanished without a shutdown
    PAUSED = "paused"  # QMP STOP: QEMU paused the guest (I/O error, or an operator)
    RESUMED = "resumed"
    DESTROY_REQUESTED = "destroy requested"
    REFRESH_REQUESTED = "refresh requested"
    REFRESHED = "refreshed"  # the new QEMU runs the guest; the old one is gone
    REFRESH_FAILED = "refresh failed"  # the old QEMU kept (or got back) the guest
    SUSPEND_REQUESTED = "suspend requested"
    SUSPENDED = "suspended"  # state file written and synced; QEMU gone
    SUSPEND_FAILED = "suspend failed"  # QEMU kept the guest and runs it again
    RESUME_REQUESTED = "resume requested"  # a start of a suspended VM: QEMU ``-incoming``


S, E = VmState, Event
TRANSITIONS: dict[tuple[VmState, Event], VmState] = {
    # A VM in ``creating`` leaves it only as created; a failed create (or one an agent
    # crash interrupted, found at the next start) removes the record instead.
    (S.CREATING, E.CREATED): S.STOPPED,
    (S.STOPPED, E.START_REQUESTED): S.STARTING,
    (S.CRASHED, E.START_REQUESTED): S.STARTING,
    (S.STARTING, E.STARTED): S.RUNNING,
    (S.STARTING, E.START_FAILED): S.STOPPED,
    (S.STARTING, E.DIED): S.CRASHED,
    (S.RUNNING, E.STOP_REQUESTED): S.STOPPING,
    (S.RUNNING, E.STOPPED): S.STOPPED,
    (S.RUNNING, E.DIED): S.CRASHED,
    (S.RUNNING, E.PAUSED): S.PAUSED,
    (S.PAUSED, E.RESUMED): S.RUNNING,
    (S.PAUSED, E.STOP_REQUESTED): S.STOPPING,
    (S.PAUSED, E.STOPPED): S.STOPPED,
    (S.PAUSED, E.DIED): S.CRASHED,
    (S.PAUSED, E.DESTROY_REQUESTED): S.DESTROYING,
    (S.STOPPING, E.STOPPED): S.STOPPED,
    (S.STOPPING, E.DIED): S.STOPPED,
    (S.STOPPED, E.DESTROY_REQUESTED): S.DESTROYING,
    (S.CRASHED, E.DESTROY_REQUESTED): S.DESTROYING,
    (S.RUNNING, E.DESTROY_REQUESTED): S.DESTROYING,
    (S.STARTING, E.DESTROY_REQUESTED): S.DESTROYING,
    (S.DESTROYING, E.DESTROY_REQUESTED): S.DESTROYING,  # again, if QEMU did not exit
    (S.DESTROYING, E.STOPPED): S.DESTROYING,
    (S.DESTROYING, E.DIED): S.DESTROYING,
    # ``vm refresh``: only a running guest (the new QEMU starts it once it has it)
    (S.RUNNING, E.REFRESH_REQUESTED): S.REFRESHING,
    (S.REFRESHING, E.REFRESHED): S.RUNNING,
    (S.REFRESHING, E.REFRESH_FAILED): S.RUNNING,
    (S.REFRESHING, E.DIED): S.CRASHED,  # the QEMU that had the guest vanished
    # suspend to a file, resume from it (reboot upgrades); a paused guest resumes running
    (S.RUNNING, E.SUSPEND_REQUESTED): S.SUSPENDING,
    (S.PAUSED, E.SUSPEND_REQUESTED): S.SUSPENDING,
    (S.SUSPENDING, E.SUSPENDED): S.SUSPENDED,
    (S.SUSPENDING, E.SUSPEND_FAILED): S.RUNNING,
    (S.SUSPENDING, E.DIED): S.CRASHED,
    (S.SUSPENDED, E.RESUME_REQUESTED): S.STARTING,  # a failed resume cold-starts it
    (S.SUSPENDED, E.DESTROY_REQUESTED): S.DESTROYING,
}

_ACTION_EVENT = {
    Action.START: E.START_REQUESTED,
    Action.STOP: E.STOP_REQUESTED,
    Action.DESTROY: E.DESTROY_REQUESTED,
    Action.REFRESH: E.REFRESH_REQUESTED,
    Action.SUSPEND: E.SUSPEND_REQUESTED,
}


class VmStateError(HatcheryError):
    """A request that the VM's current state does not allow."""


def next_state(name: str, current: VmState, event: Event) -> VmState:
    try:
        return TRANSITIONS[(current, event)]
    except KeyError:
        raise VmStateError(f"vm {name} is {current}: cannot handle '{event}'") from None


def check_action(name: str, current: VmState, action: Action) -> VmState:
    """The state ``action`` leads to, or a readable refusal ("vm web1 is stopping, ...")."""
    if (current, _ACTION_EVENT[action]) not in TRANSITIONS:
        raise VmStateError(f"vm {name} is {current}, cannot {action} it")
    return TRANSITIONS[(current, _ACTION_EVENT[action])]


@dataclass(frozen=True, slots=True)
class KernelBoot:
    kernel: str
    initrd: str | None = None
    cmdline: str = "console=ttyS0"


@dataclass(frozen=True, slots=True)
class DiskBoot:
    image: str  # path or URL the root volume was made from
    format: str = "qcow2"


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """A container VM's workload (HyperVM, docs/appliance.md): the image in the node's
    container store (``NAME:TAG``), environment added to the image's, the ports it serves."""

    image: str
    env: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class VmRecord:
    name: str
    uuid: str
    state: VmState
    vcpus: int
    memory_mib: int
    disk_mib: int
    bridge: str
    ip: str
    mac: str
    owner_group: str | None = None
    kernel_boot: KernelBoot | None = None
    disk_boot: DiskBoot | None = None
    user_data: str = ""
    public_keys: tuple[str, ...] = ()
    created: float = 0.0
    pid: int | None = None
    started: float | None = None
    machine: str = DEFAULT_MACHINE
    # qboot for a direct kernel boot, else None: QEMU's default; chosen at create and kept,
    # as the machine is, for its migration state (``qemu.firmware``)
    firmware: str | None = None
    reason: str | None = None  # why it is crashed/stopped, for the operator
    labels: dict[str, str] = field(default_factory=dict)
    # the uid (= gid) its QEMU runs as (``vms/sandbox.py``), the VM's own; given at its
    # first start (a record from an older agent has none until then), kept for its life
    uid: int | None = None
    # the new QEMU while ``refreshing`` (a restarted agent decides which one keeps the VM)
    incoming_pid: int | None = None
    # while ``suspended``: the saved guest, and when it was paused (for ``pause_seconds``)
    state_file: str | None = None
    suspended_at: float | None = None
    # how long the guest was last paused by a refresh or a suspend and resume, in seconds
    pause_seconds: float | None = None
    # a container VM's workload, what became of its image download (``pulling``,
    # ``pulled``, ``refused: why``), and what its init last said of the container on its
    # status port since its last start (``started``, ``exited N``: ``vms.status_port``)
    container: ContainerSpec | None = None
    container_state: str | None = None
    container_status: str | None = None

    def with_state(self, state: VmState, **changes: Any) -> VmRecord:
        return replace(self, state=state, **changes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmRecord:
        data = dict(data)
        data["state"] = VmState(data["state"])
        data["public_keys"] = tuple(data.get("public_keys", ()))
        if data.get("kernel_boot"):
            data["kernel_boot"] = KernelBoot(**data["kernel_boot"])
        if data.get("disk_boot"):
            data["disk_boot"] = DiskBoot(**data["disk_boot"])
        if data.get("container"):
            spec = dict(data["container"])
            spec["ports"] = tuple(spec.get("ports", ()))
            data["container"] = ContainerSpec(**spec)
        return cls(**data)
