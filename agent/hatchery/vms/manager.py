"""The VM manager: create, start, stop, destroy, list; re-adopt running VMs at start.

Every change of a VM is written to its record (``vms/<name>/vm.json``, atomically) before the
agent acts on it, so a crash in the middle is finished or undone at the next start. QEMU
runs detached (see ``process``); this object only holds QMP connections and exit watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from hatchery import host, netdev, state
from hatchery.addresses import AddressPool
from hatchery.capacity import HostCapacity, Resources
from hatchery.config import VmIsolationConfig, VmSourcesConfig
from hatchery.errors import CommandError, HatcheryError
from hatchery.metrics import Metrics, VmMeter
from hatchery.qemu import firmware, machines
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.qemu.cmdline import DEFAULT_MACHINE, DirectKernel, GuestSpec, Nic, build_argv
from hatchery.vms import limits, logtrim, migration, process, sandbox, status_port
from hatchery.vms.model import (
    NAME_RE,
    Action,
    ContainerSpec,
    DiskBoot,
    Event,
    KernelBoot,
    VmRecord,
    VmState,
    VmStateError,
    check_action,
    next_state,
)
from hatchery.vms.monitor import Monitor, MonitorError
from hatchery.vms.sources import FolderFile, Source, SourceError, SourceFetcher
from hatchery.vms.status_port import StatusReader
from hatchery.wire import VmOutcome, VmResult

log = logging.getLogger(__name__)

METADATA_URL = "http://169.254.169.254/nocloud/"
LIVE_STATES = (VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.SUSPENDING)
#: Seconds a QEMU that does not answer QMP gets between SIGTERM and SIGKILL.
KILL_GRACE = 5.0
#: Seconds a running QEMU gets to answer QMP when the agent re-adopts it (it answers at once).
ADOPT_QMP_TIMEOUT = 10.0
#: Seconds a refresh may take to move the guest, and a suspend or a resume to save or load it.
REFRESH_TIMEOUT = 300.0
SUSPEND_TIMEOUT = 600.0


class VmError(HatcheryError):
    """A VM request that cannot be done."""


class NotFound(VmError):
    """No VM of that name."""


class MoveFailed(VmError):
    """A refresh or a suspend did not complete; the VM runs on in the QEMU it had."""


def _tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log (QEMU's own output), joined; empty if there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "; ".join(text.strip().splitlines()[-lines:])


async def _check_qcow2(path: Path) -> None:
    """Refuse a qcow2 image that refers to other files (backing file, external data file)."""
    info = await host.run_async(["qemu-img", "info", "-f", "qcow2", "--output=json", str(path)],
                                timeout=60)  # fmt: skip
    try:
        data = json.loads(info.stdout)
    except ValueError as exc:
        raise VmError(f"qemu-img info gave no JSON for {path.name}") from exc
    specific = data.get("format-specific", {}).get("data", {})
    if data.get("backing-filename") or data.get("full-backing-filename"):
        raise SourceError(
            "disk.image: the qcow2 image names a backing file: refused",
            "disk.image",
            hint="flatten it (qemu-img convert) or send it raw",
        )
    if specific.get("data-file"):
        raise SourceError(
            "disk.image: the qcow2 image names an external data file: refused",
            "disk.image",
            hint="flatten it (qemu-img convert) or send it raw",
        )


async def _virtual_mib(volume: Path) -> int:
    """The virtual size of the qcow2 ``volume``, in whole MiB (``qemu-img info``)."""
    info = await host.run_async(["qemu-img", "info", "-f", "qcow2", "--output=json",
                                 str(volume)], timeout=60)  # fmt: skip
    try:
        size = int(json.loads(info.stdout)["virtual-size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise VmError(f"qemu-img info gave no virtual size for {volume.name}") from exc
    return -(-size // (1024 * 1024))


#: QEMU's seccomp filter for every VM: no obsolete system calls, no setuid/setgid or new
#: sessions, no fork/exec (QEMU needs none of them: the agent makes the taps, ``script=no``),
#: no changes of scheduling or CPU affinity. A guest that escapes into QEMU finds these shut.
#: (It is why QEMU is not started with ``-daemonize``: see ``process.launch``.)
SANDBOX = ("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
#: the fdset (``-add-fd``) that holds the console log's descriptor (``sandbox.QemuChannels``)
CONSOLE_LOG_FDSET = 1


@dataclass(frozen=True, slots=True)
class KernelRequest:
    """Direct kernel boot as asked for: where the kernel and initrd come from."""

    kernel: Source
    initrd: Source | None = None
    cmdline: str = "console=ttyS0"


@dataclass(frozen=True, slots=True)
class DiskRequest:
    """Disk boot as asked for: the image the root volume is made from, in its declared
    format (``raw`` or ``qcow2``; what it is read as, whatever its bytes look like)."""

    image: Source
    format: str = "qcow2"


@dataclass(frozen=True, slots=True)
class CreateRequest:
    name: str
    vcpus: int = 1
    memory_mib: int = 256
    disk_mib: int = 0
    bridge: str | None = None
    kernel_boot: KernelRequest | None = None
    disk_boot: DiskRequest | None = None
    user_data: str = ""
    public_keys: tuple[str, ...] = ()
    owner_group: str | None = None
    machine: str = DEFAULT_MACHINE
    start: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    container: ContainerSpec | None = None


#: The kernel command line word that makes the appliance's init run its container.
CONTAINER_CMDLINE = "hatchery.service=container"


class PortRules(Protocol):
    """What the manager needs from whoever guards the bridge ports (the metadata service's
    anti-spoofing rules): told when a bridge's set of VM ports changes, and awaited before
    QEMU can send a frame, so a port's rules exist before its VM does."""

    async def ports_changed(self, bridge: str) -> None: ...


@dataclass
class _Live:
    """What the agent holds for a running VM: its QMP connection and exit watch."""

    monitor: Monitor | None = None
    watch: process.ExitWatch | None = None
    shutdown_seen: bool = False
    status: StatusReader = field(default_factory=StatusReader)  # a container VM's status port

    async def let_go(self) -> None:
        """Stop watching this QEMU and drop its QMP connection (it keeps running)."""
        if self.watch is not None:
            self.watch.close()
        if self.monitor is not None:
            await self.monitor.close()


class VmManager:
    def __init__(
        self,
        state_dir: Path,
        pool: AddressPool,
        capacity: HostCapacity,
        accel: AccelChoice,
        qemu_binary: str = "qemu-system-x86_64",
        on_change: Callable[[VmRecord], None] | None = None,
        port_rules: PortRules | None = None,
        sources: SourceFetcher | None = None,
        isolation: VmIsolationConfig | None = None,
        meter: VmMeter | None = None,
    ) -> None:
        self._isolation = isolation or VmIsolationConfig()
        if not self._isolation.unprivileged:
            log.warning("vms.unprivileged is off: every VM's QEMU runs as root")
        elif accel.accel is Accel.KVM and (problem := sandbox.kvm_problem()) is not None:
            log.error("QEMU runs as a user of its own VM's and cannot use KVM: %s", problem)
        if process.scope_runner() is None:
            log.warning("no systemd here: each VM's QEMU runs without a memory or task limit")
        self._port_rules = port_rules
        self._meter = meter or Metrics().vms()
        self._sources = sources or SourceFetcher(VmSourcesConfig())
        self._dir = state_dir / "vms"
        self._pool = pool
        self._capacity = capacity
        self._accel = accel
        self._qemu = qemu_binary
        self._on_change = on_change
        self._vms: dict[str, VmRecord] = {}
        self._live: dict[str, _Live] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._trimmer: asyncio.Task[None] | None = None
        self._untrimmable: set[Path] = set()
        self._background: set[asyncio.Task[None]] = set()

    # --- records ------------------------------------------------------------------------
    def _vm_dir(self, name: str) -> Path:
        return self._dir / name

    def _files(self, vm: VmRecord) -> sandbox.VmFiles:
        return sandbox.VmFiles(self._vm_dir(vm.name), legacy=vm.uid is None)

    def _save(self, vm: VmRecord) -> VmRecord:
        state.write_json(self._vm_dir(vm.name) / "vm.json", vm.to_json())
        self._vms[vm.name] = vm
        if self._on_change is not None:
            self._on_change(vm)
        return vm

    def _transition(self, vm: VmRecord, event: Event, **changes: Any) -> VmRecord:
        new_state = next_state(vm.name, vm.state, event)
        self._meter.event(event.name.lower())
        if new_state is not vm.state:
            log.info("vm %s: %s -> %s (%s)", vm.name, vm.state, new_state, event)
        return self._save(vm.with_state(new_state, **changes))

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def set_container_state(self, name: str, text: str) -> None:
        """What became of a container VM's image download (read-modify-write with no await
        in between, so it cannot undo a transition saved meanwhile)."""
        vm = self._vms.get(name)
        if vm is None or vm.state is VmState.DESTROYING:
            return
        try:
            self._save(replace(vm, container_state=text[:500]))
        except OSError as exc:  # its folder going away under a destroy
            log.warning("vm %s: cannot record its container state: %s", name, exc)

    async def container_status(self, vm: VmRecord) -> str | None:
        """What a container VM's init last said on its status port (``status_port``): the
        ring of its running QEMU drained first, then the record's."""
        live = self._live.get(vm.name)
        if vm.container is not None and live is not None:
            await self._drain_status(vm.name, live)
        current = self._vms.get(vm.name)
        return current.container_status if current is not None else None

    async def _drain_status(self, name: str, live: _Live) -> None:
        """Read a container VM's status ring into its record (saved only when it changes)."""
        vm = self._vms.get(name)
        if vm is None or vm.container is None or live.monitor is None:
            return
        try:
            line = await live.status.drain(live.monitor)
        except MonitorError as exc:
            log.debug("vm %s: status port not read: %s", name, exc)
            return
        current = self._vms.get(name)
        if line is not None and current is not None and line != current.container_status:
            with contextlib.suppress(OSError):  # its folder going away under a destroy
                self._save(replace(current, container_status=line))

    async def _after_poweroff(self, name: str, live: _Live) -> None:
        """A container VM's guest powered off and its QEMU waits (``-action shutdown=pause``):
        read the status ring's last words, then let QEMU exit."""
        await self._drain_status(name, live)
        if live.monitor is not None:
            await live.monitor.quit()

    def get(self, name: str) -> VmRecord:
        try:
            return self._vms[name]
        except KeyError:
            raise NotFound(f"no vm named {name!r}") from None

    def records(self) -> list[VmRecord]:
        return sorted(self._vms.values(), key=lambda v: v.name)

    def used(self) -> Resources:
        total = Resources()
        for vm in self._vms.values():
            total = total + Resources(vm.vcpus, vm.memory_mib, vm.disk_mib)
        return total

    @property
    def capacity(self) -> HostCapacity:
        return self._capacity

    def console_log(self, name: str) -> Path:
        """Written by QEMU, so open it with ``sandbox.open_untrusted``."""
        return self._files(self.get(name)).console_log

    def console_socket(self, name: str) -> tuple[Path, tuple[int, ...]]:
        """VM ``name``'s console socket and the uids it may belong to: QEMU makes it, so
        connect only through ``sandbox.checked_socket`` (``vms.console`` does)."""
        vm = self.get(name)
        return self._files(vm).console, sandbox.socket_owners(vm.uid)

    # --- start-up: re-adopt ------------------------------------------------------------
    async def adopt_all(self) -> None:
        """Load every record; reconnect to live QEMUs; settle the rest.

        What a crash in the middle of a create left is cleaned up first (see ``_reserve``):
        a folder without ``vm.json``, a record still ``creating``, an address whose owner
        has no folder. A folder whose record was kept aside as corrupt stays, with its
        address, for the operator to look at.
        """
        self._dir.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self._dir.iterdir()):
            if (folder.is_dir() and not (folder / "vm.json").exists()
                    and not any(folder.glob("vm.json.corrupt-*"))):  # fmt: skip
                shutil.rmtree(folder, ignore_errors=True)
                freed = self._release_held_by(folder.name)
                log.warning("vm %s: removed its folder, which has no record (the agent stopped "
                            "while creating it); free again: %s", folder.name,
                            ", ".join(freed) or "no address")  # fmt: skip
        for path, raw in state.iter_json_files_nested(self._dir, "vm.json"):
            try:
                vm = VmRecord.from_json(raw)
            except (TypeError, ValueError, KeyError) as exc:
                state.set_aside(path, f"not a VM record: {exc}")
                continue
            if vm.state is VmState.CREATING:
                self._forget_creating(vm)
                log.warning("vm %s: removed, the agent stopped while creating it; %s is free "
                            "again", vm.name, vm.ip)  # fmt: skip
                continue
            self._vms[vm.name] = vm
            with contextlib.suppress(HatcheryError):
                self._pool.claim(ipaddress.IPv4Address(vm.ip), vm.name)
            await self._adopt(vm)
        self._release_unowned()
        if self._trimmer is None:
            self._trimmer = asyncio.create_task(self._trim_logs(), name="vm log trimmer")

    async def _trim_logs(self) -> None:
        """Keep what guests make QEMU write within ``vms.log_limit_bytes`` (``logtrim``):
        each running VM's console log and QEMU output, every ``TRIM_INTERVAL`` seconds."""
        while True:
            files = [
                (self._files(vm), sandbox.socket_owners(vm.uid))
                for name in list(self._live)
                if (vm := self._vms.get(name)) is not None
            ]
            if files:  # no thread woken on a node without running VMs
                await asyncio.to_thread(self._trim_once, files)
            await asyncio.sleep(logtrim.TRIM_INTERVAL)

    def _trim_once(self, files: list[tuple[sandbox.VmFiles, tuple[int, ...]]]) -> None:
        limit = self._isolation.log_limit_bytes
        # a VM no longer running is forgotten: warned again if it starts with the same problem
        self._untrimmable &= {p for f, _ in files for p in (f.console_log, f.qemu_log)}
        for vm_files, owners in files:
            for path, uids in ((vm_files.console_log, owners), (vm_files.qemu_log, (0,))):
                try:
                    if freed := logtrim.trim(path, limit, uids):
                        log.info("vm %s: %s over %d bytes: its oldest %d cut", vm_files.dir.name,
                                 path.name, limit, freed)  # fmt: skip
                    self._untrimmable.discard(path)
                except OSError as exc:
                    if path not in self._untrimmable:  # once, not every interval
                        self._untrimmable.add(path)
                        log.warning("vm %s: cannot trim %s: %s", vm_files.dir.name, path.name,
                                    exc)  # fmt: skip

    def _release_unowned(self) -> None:
        """Return to the pool every address held by a name that has no folder here: the
        agent stopped between taking it and writing the record."""
        folders = {folder.name for folder in self._dir.iterdir() if folder.is_dir()}
        for row in self._pool.listing():
            owner = row["owner"]
            if owner is not None and owner not in folders:
                self._pool.release(ipaddress.IPv4Address(row["ip"]), owner)
                log.warning("address %s: released, its owner %s has no record (the agent "
                            "stopped while creating it)", row["ip"], owner)  # fmt: skip

    def _release_held_by(self, name: str) -> list[str]:
        """Release every address ``name`` holds; the addresses released."""
        held = [row["ip"] for row in self._pool.listing() if row["owner"] == name]
        for ip in held:
            self._pool.release(ipaddress.IPv4Address(ip), name)
        return held

    async def _adopt(self, vm: VmRecord) -> None:
        alive = vm.pid is not None and process.is_ours(vm.pid, vm.uuid)
        if vm.state is VmState.DESTROYING:
            try:
                await self._finish_destroy(vm)
            except VmError as exc:
                log.error("%s", exc.message)
        elif vm.state is VmState.REFRESHING:
            await self._adopt_refreshing(vm)
        elif vm.state is VmState.SUSPENDED and alive:
            # saved, but the agent stopped before it quit QEMU, which still holds the tap
            assert vm.pid is not None
            await process.terminate(vm.pid, vm.uuid, grace=KILL_GRACE)
            self._save(replace(vm, pid=None))
        elif vm.state in LIVE_STATES or vm.state is VmState.PAUSED:
            if alive:
                assert vm.pid is not None
                try:
                    await self._attach(vm, vm.pid, timeout=ADOPT_QMP_TIMEOUT)
                except (MonitorError, ProcessLookupError) as exc:
                    await self._unanswering(vm, vm.pid, exc)
                    return
                log.info("vm %s: re-adopted running QEMU pid %s", vm.name, vm.pid)
                if vm.container is not None:
                    await self._adopt_powered_off(vm.name)
                if vm.state is VmState.STARTING:
                    self._transition(vm, Event.STARTED)
                elif vm.state is VmState.STOPPING:
                    asyncio.create_task(self.stop(vm.name), name=f"resume-stop-{vm.name}")
                elif vm.state is VmState.SUSPENDING:  # the save was cut short: run it again
                    await migration.resume_if_stopped(self._live[vm.name].monitor)
                    self._transition(vm, Event.SUSPEND_FAILED, reason="suspend interrupted "
                                     "by an agent restart")  # fmt: skip
            else:
                why = "QEMU exited while the agent was down"
                cause = await asyncio.to_thread(limits.exit_cause, vm.pid, None,
                                                vm.started or 0.0) if vm.pid else None  # fmt: skip
                self._settle_dead(vm, f"{why}: {cause}" if cause else why)

    async def _adopt_powered_off(self, name: str) -> None:
        """A container VM whose guest powered off while the agent was down: its QEMU waits
        in runstate ``shutdown`` for the agent to read its status ring (``_after_poweroff``)."""
        live = self._live.get(name)
        if live is None or live.monitor is None:
            return
        try:
            answer = await live.monitor.execute("query-status")
        except MonitorError as exc:
            log.warning("vm %s: %s", name, exc)
            return
        if isinstance(answer, dict) and answer.get("status") == "shutdown":
            live.shutdown_seen = True
            await self._after_poweroff(name, live)

    async def _unanswering(self, vm: VmRecord, pid: int, exc: HatcheryError | OSError) -> None:
        """A QEMU of ours that does not answer QMP is stopped, not forgotten: left running,
        it would hold the VM's tap and disk while the record says crashed, and a destroy
        would give its address to another VM. Settled as crashed once it is gone; if even
        SIGKILL does not end it, the record keeps its PID (destroy tries again)."""
        await self._let_go(vm.name)
        if not process.is_ours(pid, vm.uuid):  # it exited in the meantime
            self._settle_dead(vm, "QEMU exited while the agent was re-adopting it")
            return
        log.warning("vm %s: cannot re-attach: %s; stopping QEMU pid %s", vm.name, exc, pid)
        why = f"QEMU did not answer on QMP after the agent restarted ({exc})"
        if await process.terminate(pid, vm.uuid, grace=KILL_GRACE):
            self._settle_dead(vm, why + "; the agent stopped it")
        else:
            self._transition(vm, Event.DIED, reason=why + f"; pid {pid} does not exit")
            log.error("vm %s: QEMU pid %s does not answer and does not exit", vm.name, pid)

    async def _let_go(self, name: str) -> None:
        """Drop the agent's QMP connection and exit watch of ``name``, if it has them."""
        live = self._live.pop(name, None)
        if live is not None:
            if live.watch is not None:
                live.watch.close()
            if live.monitor is not None:
                await live.monitor.close()

    def _settle_dead(self, vm: VmRecord, why: str) -> None:
        if vm.state is VmState.STOPPING:
            self._transition(vm, Event.DIED, pid=None, reason=None)
        else:
            self._transition(vm, Event.DIED, pid=None, reason=why)
            log.error("vm %s: crashed: %s", vm.name, why)

    # --- create ---------------------------------------------------------------------------
    async def create(self, req: CreateRequest) -> VmRecord:
        if not NAME_RE.match(req.name):
            raise VmError(
                f"bad vm name {req.name!r}",
                hint="1-32 characters: lowercase letters, digits, inner dashes",
            )
        if (req.kernel_boot is None) == (req.disk_boot is None):
            raise VmError("a vm needs exactly one of kernel boot or disk boot")
        if req.container is not None:
            if req.kernel_boot is None:
                raise VmError("a container VM boots the appliance kernel: give its kernel "
                              "and initrd", hint="see docs/appliance.md")  # fmt: skip
            boot = req.kernel_boot
            if CONTAINER_CMDLINE not in boot.cmdline.split():
                boot = replace(boot, cmdline=f"{boot.cmdline} {CONTAINER_CMDLINE}".strip())
            req = replace(req, kernel_boot=boot)
        async with self._lock(req.name):
            vm = self._reserve(req)
            try:
                if req.disk_boot is not None:
                    vm = await self._make_volume(vm, req.disk_boot)
                if req.kernel_boot is not None:
                    vm = replace(vm, kernel_boot=await self._fetch_kernel(vm.name, req.kernel_boot))
                vm = replace(vm, machine=await machines.versioned(self._qemu, vm.machine))
                vm = self._transition(vm, Event.CREATED)
            except BaseException:
                self._forget_creating(vm)
                raise
            log.info("vm %s: created (%s on %s)", vm.name, vm.ip, vm.bridge)
        if req.start:
            return await self.start(req.name)
        return vm

    def _reserve(self, req: CreateRequest) -> VmRecord:
        """Check capacity, take an address and persist the record in ``creating``: one step.

        Synchronous on purpose: no other create runs between the capacity check and the
        record that counts in ``used()``, so parallel creates that each fit alone cannot
        overcommit the host. The record is on disk before any slow work, so an agent that
        dies while fetching finds it at its next start (``adopt_all``) and cleans it up. A
        crash between the pool write and the record write leaves a pool row whose owner has
        no record, or a folder without ``vm.json``: both are cleaned up at start too.
        """
        if req.name in self._vms:
            raise VmError(f"a vm named {req.name} already exists")
        self._capacity.check(self.used(), Resources(req.vcpus, req.memory_mib, req.disk_mib))
        if req.kernel_boot is not None:  # refuse a path outside the folders before anything
            for source, field_name in ((req.kernel_boot.kernel, "kernel.kernel"),
                                       (req.kernel_boot.initrd, "kernel.initrd")):  # fmt: skip
                if isinstance(source, FolderFile):
                    os.close(self._sources.open_in_folder(source.path, field_name).fd)
        if req.disk_boot is not None and isinstance(req.disk_boot.image, FolderFile):
            os.close(self._sources.open_in_folder(req.disk_boot.image.path, "disk.image").fd)
        folder = self._vm_dir(req.name)
        try:
            folder.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise VmError(
                f"vm {req.name}: its folder {folder} is there without a record "
                "(a corrupt vm.json kept aside?)",
                hint="look at it, then remove the folder",
            ) from None
        address = None
        try:
            address = self._pool.allocate(req.name, req.bridge)
            vm = VmRecord(
                name=req.name, uuid=str(uuidlib.uuid4()), state=VmState.CREATING,
                vcpus=req.vcpus, memory_mib=req.memory_mib, disk_mib=req.disk_mib,
                bridge=address.subnet.bridge, ip=str(address.ip), mac=address.mac,
                owner_group=req.owner_group, user_data=req.user_data,
                public_keys=req.public_keys, created=time.time(), machine=req.machine,
                labels=dict(req.labels), container=req.container,
                firmware=firmware.for_new_vm(req.kernel_boot is not None),
            )  # fmt: skip
            return self._save(vm)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            self._vms.pop(req.name, None)
            if address is not None:
                self._pool.release(address.ip, req.name)
            raise

    def _forget_creating(self, vm: VmRecord) -> None:
        """Undo a create: its folder (record included), its address, its place in ``used()``."""
        shutil.rmtree(self._vm_dir(vm.name), ignore_errors=True)
        self._vms.pop(vm.name, None)
        self._pool.release(ipaddress.IPv4Address(vm.ip), vm.name)

    async def _fetch_kernel(self, name: str, boot: KernelRequest) -> KernelBoot:
        """Kernel and initrd are copied into the VM's folder, once: QEMU opens only those."""
        files = sandbox.VmFiles(self._vm_dir(name))
        kernel = files.kernel
        await self._sources.fetch(boot.kernel, kernel, "kernel.kernel")
        initrd = None
        if boot.initrd is not None:
            initrd = files.initrd
            await self._sources.fetch(boot.initrd, initrd, "kernel.initrd")
        return KernelBoot(str(kernel), str(initrd) if initrd else None, boot.cmdline)

    async def _make_volume(self, vm: VmRecord, disk: DiskRequest) -> VmRecord:
        """``vm`` with its root volume, converted from the image copied into the VM's folder,
        and the volume's virtual size as its ``disk_mib`` (the image's own when the request
        named none: it bounds what QEMU may write, ``vms.limits``).

        ``qemu-img`` always gets the declared format (``-f``): an image declared raw is read
        as raw bytes even if they form a qcow2 header, so no backing file it names is ever
        opened. A declared qcow2 may name neither a backing file nor an external data file
        (both would be host paths of the tenant's choosing): ``qemu-img info``, which opens
        no backing file, tells, and such an image is refused.
        """
        source = self._vm_dir(vm.name) / "source.img"
        volume = sandbox.VmFiles(self._vm_dir(vm.name)).disk
        await self._sources.fetch(disk.image, source, "disk.image")
        try:
            if disk.format == "qcow2":
                await _check_qcow2(source)
            await host.run_async(["qemu-img", "convert", "-f", disk.format, "-O", "qcow2",
                                  str(source), str(volume)], timeout=3600)  # fmt: skip
        except CommandError as exc:
            raise VmError(f"cannot make the root volume: {exc.message}") from exc
        finally:
            source.unlink(missing_ok=True)
        if vm.disk_mib:
            try:
                await host.run_async(["qemu-img", "resize", str(volume), f"{vm.disk_mib}M"])
            except CommandError as exc:
                raise VmError(f"cannot resize the root volume: {exc.message}") from exc
        try:
            size = await _virtual_mib(volume)  # made here, no QEMU has run on it yet
        except CommandError as exc:
            raise VmError(f"cannot read the root volume's size: {exc.message}") from exc
        return replace(vm, disk_boot=DiskBoot(str(disk.image), disk.format), disk_mib=size)

    # --- start ----------------------------------------------------------------------------
    def _argv(
        self, vm: VmRecord, tap_fd: int, channels: sandbox.QemuChannels, *, incoming: bool = False
    ) -> list[str]:
        """QEMU's command line: every path relative to the VM's folder, QEMU's working
        directory (``sandbox``); the tap as the descriptor ``tap_fd`` the agent opened, the
        QMP and console sockets and the console log as the descriptors of ``channels``
        (``-add-fd`` makes the log an fdset that the chardev's ``logfile`` names).

        ``incoming``: a QEMU that takes a guest over (``-incoming defer``: the agent hands it
        the stream over QMP). It is built from the same record, the versioned machine
        included, so it is the same device model; while the QEMU it replaces still runs
        (a refresh) its sockets have other names (``*.next``)."""
        files = self._files(vm)
        boot = None
        if vm.kernel_boot is not None:
            kb = vm.kernel_boot
            for path in (kb.kernel, kb.initrd):
                if path is not None and Path(path).parent != files.dir:
                    raise VmError(
                        f"vm {vm.name} boots {path}, a host path outside its folder",
                        hint="it was created before sources were checked: destroy and re-create it",
                    )
            initrd = Path(files.rel(Path(kb.initrd))) if kb.initrd else None
            boot = DirectKernel(Path(files.rel(Path(kb.kernel))), initrd, kb.cmdline)
        extra = [
            *SANDBOX,
            "-uuid", vm.uuid,
            "-add-fd", f"fd={channels.console_log},set={CONSOLE_LOG_FDSET}",
            "-chardev",
            f"socket,id=console,fd={channels.console.fileno()},server=on,wait=off,"
            f"logfile=/dev/fdset/{CONSOLE_LOG_FDSET},logappend=on",
            "-chardev", f"socket,id=qmp,fd={channels.qmp.fileno()},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip
        if vm.disk_boot is not None:
            extra += [
                "-drive", f"file={files.rel(files.disk)},if=virtio,format=qcow2,cache=none",
            ]  # fmt: skip
        if vm.container is not None:  # the init's status port, read over QMP
            extra += status_port.qemu_args()
        spec = GuestSpec(
            name=vm.name,
            accel=self._accel,
            memory_mib=vm.memory_mib,
            vcpus=vm.vcpus,
            machine=vm.machine,
            firmware=firmware.qemu_path(vm.firmware),
            boot=boot,
            nics=(Nic(netdev.tap_name(vm.uuid), vm.mac, fd=tap_fd),),
            serial="chardev:console",
            smbios=(
                f"type=1,manufacturer=Hatchery,product=Hatchery VM,uuid={vm.uuid},"
                f"serial=ds=nocloud-net;s={METADATA_URL}",
            ),
            extra=tuple(extra),
        )
        return build_argv(spec, self._qemu) + (["-incoming", "defer"] if incoming else [])

    def _user(self, vm: VmRecord) -> sandbox.QemuUser | None:
        """Who its QEMU runs as: its own uid, or root where the node does not allow that."""
        if vm.uid is None or not self._isolation.unprivileged:
            return None
        return sandbox.qemu_user(vm.uid)

    async def start(self, name: str) -> VmRecord:
        """Start a stopped or crashed VM; resume a suspended one from its state file (and
        cold-start it if that fails, the reason kept in its record)."""
        async with self._lock(name):
            vm = self.get(name)
            if vm.state is VmState.SUSPENDED:
                return await self._resume(vm)
            check_action(name, vm.state, Action.START)
            return await self._cold_start(vm)

    async def _cold_start(self, vm: VmRecord) -> VmRecord:
        name = vm.name
        uid = vm.uid  # picked and saved with no await between: no two VMs get one uid
        if uid is None:
            uid = sandbox.pick_uid((v.uid for v in self._vms.values()), self._isolation)
        vm = self._transition(
            vm, Event.START_REQUESTED, reason=None, uid=uid, container_status=None
        )  # a new boot: its init says it anew
        try:
            if not machines.is_versioned(vm.machine):  # an older agent's record: fixed now
                machine = await machines.versioned(self._qemu, vm.machine)
                vm = self._save(replace(vm, machine=machine))
            vm = await self._sized(vm)
            pid = await self._spawn(vm)
        except HatcheryError as exc:
            self._transition(vm, Event.START_FAILED, reason=f"start failed: {exc.message}")
            raise VmError(f"cannot start vm {name}: {exc.message}") from exc
        vm = self._save(vm.with_state(VmState.STARTING, pid=pid))
        try:
            await self._attach(vm, pid)
        except (MonitorError, ProcessLookupError) as exc:
            current = self.get(name)
            if current.state is VmState.STARTING and process.is_ours(pid, vm.uuid):
                process.kill(pid, vm.uuid)
                self._transition(current, Event.DIED, pid=None, reason=str(exc))
                raise VmError(f"vm {name} started but QMP failed: {exc}") from exc
            if current.state is VmState.STARTING:  # died; its exit watch has not run yet
                live = self._live.pop(name, None)
                if live is not None and live.watch is not None:
                    live.watch.close()
                current = self._transition(current, Event.START_FAILED, pid=None,
                                           reason=self._start_failure(name))  # fmt: skip
            raise VmError(f"cannot start vm {name}: {current.reason}") from exc
        return self._transition(vm, Event.STARTED, started=time.time())

    async def _spawn(self, vm: VmRecord, *, incoming: bool = False) -> int:
        """Prepare the VM's files and tap and start its QEMU; its PID.

        :raise HatcheryError: any step failed (QEMU's own words in the message).
        """
        files, user = self._files(vm), self._user(vm)
        tap = netdev.tap_name(vm.uuid)
        await asyncio.to_thread(sandbox.prepare, files, user)
        await netdev.ensure_tap(tap, vm.bridge, owner=user.uid if user else None)
        await self._ports_changed(vm.bridge)
        tap_fd = netdev.open_tap(tap)
        try:
            return await self._launch(vm, tap_fd, incoming=incoming)
        finally:
            os.close(tap_fd)  # QEMU holds its own copy

    async def _launch(self, vm: VmRecord, tap_fd: int, *, incoming: bool = False) -> int:
        """Start QEMU on the tap ``tap_fd``, handing it its sockets and console log
        (``sandbox.open_channels``; ``*.next`` sockets for an ``incoming`` one); an
        ``incoming`` one in a scope of its own (the QEMU it replaces may still hold
        ``hatchery-vm-NAME``)."""
        files = self._files(vm)
        unit = f"hatchery-vm-{vm.name}" + (f"-{time.time_ns()}" if incoming else "")
        channels = await asyncio.to_thread(sandbox.open_channels, files, incoming=incoming)
        try:
            return await process.launch(
                self._argv(vm, tap_fd, channels, incoming=incoming),
                unit,
                qmp=None,
                output=files.qemu_log,
                cwd=files.dir,
                user=self._user(vm),
                limits=self._limits(vm),
                pass_fds=(tap_fd, *channels.fds()),
            )
        finally:
            channels.close()  # QEMU holds its own copies

    async def _sized(self, vm: VmRecord) -> VmRecord:
        """An older agent's record of a disk VM made without a size (``disk_mib`` 0): its
        volume's virtual size, read once and kept, so its QEMU's file size limit fits the
        disk the guest has."""
        if vm.disk_boot is None or vm.disk_mib:
            return vm
        size = await _virtual_mib(self._files(vm).disk)
        log.info("vm %s: its volume's virtual size, %d MiB, now in its record", vm.name, size)
        return self._save(replace(vm, disk_mib=size))

    def _limits(self, vm: VmRecord) -> limits.QemuLimits:
        """What its QEMU may hold (``vms.limits``): the boot files as they are in its folder."""
        kb = vm.kernel_boot
        boot = tuple(Path(p) for p in (kb.kernel, kb.initrd) if p) if kb is not None else ()
        return limits.for_vm(memory_mib=vm.memory_mib, vcpus=vm.vcpus, boot_files=boot,
                             code_cache_mib=self._accel.code_cache_mib,
                             overhead_mib=self._isolation.memory_overhead_mib,
                             disk_mib=vm.disk_mib if vm.disk_boot is not None else 0,
                             log_limit=self._isolation.log_limit_bytes)  # fmt: skip

    def applied_limits(self, vm: VmRecord) -> limits.Held | None:
        """What the kernel holds the VM's running QEMU to (``limits.applied``); None when it
        does not run."""
        if vm.pid is None or not process.is_ours(vm.pid, vm.uuid):
            return None
        return limits.applied(vm.pid)

    async def _attach(
        self, vm: VmRecord, pid: int, timeout: float = 30.0, *, incoming: bool = False
    ) -> _Live:
        """Connect QMP (within ``timeout``: a QEMU that was just started may still be
        loading its kernel) and watch the process's exit.

        ``incoming``: a QEMU taking a guest over (refresh, resume), on its ``qmp.next``
        socket. It is not the VM's QEMU yet: its events and its exit touch no record until
        the caller, once it has the guest, makes it so (``self._live[name] = live``).
        """
        live = _Live()
        if not incoming:
            self._live[vm.name] = live

        def on_event(kind: str, data: dict[str, Any]) -> None:
            self._on_qmp_event(vm.name, live, kind, data)

        live.watch = process.ExitWatch(pid, lambda: self._on_exit(vm.name, live))
        owners = sandbox.socket_owners(vm.uid)
        files = self._files(vm)
        live.monitor = Monitor(vm.name, files.qmp_next if incoming else files.qmp, on_event,
                               owners)  # fmt: skip
        # QMP answers once QEMU is initialised; if QEMU exits first (a kernel it cannot
        # load), stop waiting at once: its exit watch has recorded why.
        connect = asyncio.ensure_future(live.monitor.connect(timeout))
        exited = asyncio.ensure_future(live.watch.exited.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not connect.done():
                connect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connect
        if connect.cancelled():
            raise MonitorError(f"vm {vm.name}: QEMU exited before QMP answered")
        connect.result()
        return live

    def _on_qmp_event(self, name: str, live: _Live, kind: str, data: dict[str, Any]) -> None:
        vm = self._vms.get(name)
        if vm is None or self._live.get(name) is not live:  # not (or no longer) its QEMU
            return
        if kind == "SHUTDOWN":
            live.shutdown_seen = True
            if vm.container is not None:  # its QEMU pauses: the status ring is read first
                task = asyncio.create_task(self._after_poweroff(name, live),
                                           name=f"poweroff-{name}")  # fmt: skip
                self._background.add(task)  # the loop keeps only a weak reference
                task.add_done_callback(self._background.discard)
        elif kind == "STOP" and vm.state is VmState.RUNNING and not live.shutdown_seen:
            self._transition(vm, Event.PAUSED, reason="paused by QEMU")
        elif kind == "RESUME" and vm.state is VmState.PAUSED:
            self._transition(vm, Event.RESUMED, reason=None)
        elif kind == "RESET":
            log.info("vm %s: guest reset (reboot)", name)

    def _on_exit(self, name: str, live: _Live) -> None:
        if self._live.get(name) is not live:  # an incoming QEMU: its migration's owner sees
            return  # its exit; or one the agent let go of (refreshed away, suspended)
        self._live.pop(name, None)
        vm = self._vms.get(name)
        if vm is None:
            return
        if live.monitor is not None:
            asyncio.create_task(live.monitor.close(), name=f"qmp-close-{name}")
        clean = live.shutdown_seen
        event = Event.STOPPED if clean else Event.DIED
        reason = None if clean or vm.state is VmState.STOPPING else "QEMU exited unexpectedly"
        if vm.state is VmState.STARTING and not clean:  # it gave up while initialising
            event, reason = Event.START_FAILED, self._start_failure(name)
        elif reason and vm.pid is not None and live.watch is not None:  # rare: one kmsg read
            cause = limits.exit_cause(vm.pid, live.watch.signal, vm.started or 0.0)
            reason += f": {cause}" if cause else ""
        with contextlib.suppress(VmStateError):
            self._transition(vm, event, pid=None, reason=reason)
        if reason:
            log.error("vm %s: %s", name, reason)
        asyncio.create_task(netdev.delete_link(netdev.tap_name(vm.uuid)), name=f"untap-{name}")

    def _start_failure(self, name: str) -> str:
        """Why QEMU gave up while starting: the end of its own output."""
        log_path = sandbox.VmFiles(self._vm_dir(name)).qemu_log  # the agent's file, not QEMU's
        return "start failed: " + (_tail(log_path) or "QEMU exited")

    # --- refresh, suspend, resume: the guest moves, never reboots ----------------------------
    async def refresh(self, name: str, timeout: float = REFRESH_TIMEOUT) -> VmRecord:
        """Move a running VM onto a new QEMU process of the node's QEMU binary (the one a
        live patch installed) without a guest reboot: a local live migration.

        The new QEMU is built from the same record with the machine the old one runs
        (``qom-get /machine type``, recorded), gets its own copy of the old one's tap
        descriptor (``netdev.take_tap_fd``) and ``-incoming defer``; the two are joined by
        a socket pair (``migration``). Once the new one runs the guest, the agent's QMP
        connection, exit watch and PID switch to it, the old one is stopped and the new
        one's sockets take the usual names. On any failure the old QEMU keeps (or gets
        back: ``cont``) the guest, the new one is killed, the record says why.

        :raise VmStateError: the VM is not running.
        :raise VmError: it could not be moved (it runs on in its old QEMU).
        """
        async with self._lock(name):
            vm = self.get(name)
            check_action(name, vm.state, Action.REFRESH)
            old, old_pid = self._live.get(name), vm.pid
            if old is None or old.monitor is None or old.watch is None or old_pid is None:
                raise VmError(f"vm {name}: the agent holds no QMP connection to its QEMU")
            try:
                machine = await migration.running_machine(old.monitor)
            except MonitorError as exc:
                raise VmError(f"cannot refresh vm {name}: {exc.message}") from exc
            try:
                vm = await self._sized(vm)
            except HatcheryError as exc:
                raise VmError(f"cannot refresh vm {name}: {exc.message}") from exc
            vm = self._transition(vm, Event.REFRESH_REQUESTED, machine=machine, reason=None)
            files, new, new_pid, tap_fd, hdr, held = self._files(vm), None, None, -1, 0, 0.0
            try:
                tap_fd = await asyncio.to_thread(netdev.take_tap_fd, old_pid,
                                                 netdev.tap_name(vm.uuid))  # fmt: skip
                hdr = netdev.vnet_hdr_size(tap_fd)
                await self._drain_status(name, old)  # the new QEMU's status ring starts empty
                # A starting QEMU sets the tap's virtio-net header size for a guest that has
                # negotiated nothing yet (10 bytes, not the running guest's 12): the old QEMU
                # would mangle every frame until the switch. It holds still meanwhile (its
                # frames queue in the tap), and gets the size back before it runs on.
                await old.monitor.execute("stop")
                held = time.monotonic()
                new_pid = await self._launch(vm, tap_fd, incoming=True)
                vm = self._save(replace(vm, incoming_pid=new_pid))
                new = await self._attach(vm, new_pid, incoming=True)  # QMP: its init is done
                assert new.monitor is not None
                netdev.set_vnet_hdr_size(tap_fd, hdr)
                await old.monitor.execute("cont")
                held = time.monotonic() - held
                ours, theirs = socket.socketpair()
                with ours, theirs:
                    await new.monitor.pass_fd("migrate", ours.fileno())
                    await old.monitor.pass_fd("migrate", theirs.fileno())
                await new.monitor.execute("migrate-incoming", {"uri": "fd:migrate"})
                await migration.prepare_source(old.monitor)
                await old.monitor.execute("migrate", {"uri": "fd:migrate"})
                info = await migration.wait_done(old.monitor, timeout, f"vm {name}: refresh")
                await migration.wait_running(new.monitor, 60, f"vm {name}: refresh")
            except (HatcheryError, OSError) as exc:
                why = exc.message if isinstance(exc, HatcheryError) else str(exc)
                await self._drop_incoming(vm, new, new_pid)
                if new_pid is not None and (said := _tail(files.qemu_log, 2)):
                    why += f" (QEMU: {said})"
                if hdr:
                    with contextlib.suppress(OSError):
                        netdev.set_vnet_hdr_size(tap_fd, hdr)
                await migration.resume_if_stopped(old.monitor)
                log.error("vm %s: refresh failed, it stays on QEMU pid %s: %s", name, old_pid, why)
                self._transition(self.get(name), Event.REFRESH_FAILED, incoming_pid=None,
                                 reason=f"refresh failed: {why}")  # fmt: skip
                raise MoveFailed(f"cannot refresh vm {name}: {why}",
                                 hint="it runs on in its old QEMU") from exc  # fmt: skip
            finally:
                if tap_fd >= 0:
                    os.close(tap_fd)
            # The new QEMU runs the guest: it becomes the VM's, the old one goes.
            await old.let_go()
            self._live[name] = new
            self._save(replace(self.get(name), pid=new_pid))
            if not await process.terminate(old_pid, vm.uuid, grace=KILL_GRACE):
                log.error("vm %s: the old QEMU pid %s does not exit", name, old_pid)
            self._take_next_sockets(files)
            pause = held + float(info.get("downtime", 0)) / 1000  # both times it held still
            log.info("vm %s: refreshed, QEMU pid %s -> %s, paused %.3fs", name, old_pid,
                     new_pid, pause)  # fmt: skip
            return self._transition(self.get(name), Event.REFRESHED, incoming_pid=None,
                                    pause_seconds=pause)  # fmt: skip

    async def _drop_incoming(self, vm: VmRecord, live: _Live | None, pid: int | None) -> None:
        """Kill a QEMU that did not get the guest, and forget it."""
        if live is not None:
            await live.let_go()
        if pid is not None and not await process.terminate(pid, vm.uuid, grace=0):
            log.error("vm %s: the incoming QEMU pid %s does not exit", vm.name, pid)
        files = self._files(vm)
        for path in (files.qmp_next, files.console_next):
            with contextlib.suppress(OSError):
                path.unlink()

    def _take_next_sockets(self, files: sandbox.VmFiles) -> None:
        """The new QEMU's sockets take the usual names (the old QEMU, which may remove its
        own on exit, is gone): a restarted agent and ``vm console`` find them there."""
        for src, dst in ((files.qmp_next, files.qmp), (files.console_next, files.console)):
            try:
                os.replace(src, dst)
            except OSError as exc:
                log.error("vm %s: cannot rename %s: %s", files.dir.name, src.name, exc)

    async def _adopt_refreshing(self, vm: VmRecord) -> None:
        """The agent stopped during a refresh: the QEMU that runs the guest keeps it.

        The new QEMU won if it runs the guest (it starts it only once it has it all); then
        the old one, paused after the migration, is stopped. Otherwise the new one is
        killed and the old one, if alive, gets the guest back.
        """
        files = self._files(vm)
        new_pid, old_pid = vm.incoming_pid, vm.pid
        if new_pid is not None and new_pid != old_pid and process.is_ours(new_pid, vm.uuid):
            new = None
            try:
                new = await self._attach(vm, new_pid, ADOPT_QMP_TIMEOUT, incoming=True)
                assert new.monitor is not None
                won = await migration.status(new.monitor) == "running"
            except (MonitorError, ProcessLookupError):
                won = False
            if won and new is not None:
                self._live[vm.name] = new
                vm = self._save(replace(vm, pid=new_pid))
                if old_pid is not None:
                    await process.terminate(old_pid, vm.uuid, grace=KILL_GRACE)
                self._take_next_sockets(files)
                self._transition(vm, Event.REFRESHED, incoming_pid=None,
                                 reason="refresh finished by a restarted agent")  # fmt: skip
                return
            await self._drop_incoming(vm, new, new_pid)
        vm = self._save(replace(vm, incoming_pid=None))
        if old_pid is None or not process.is_ours(old_pid, vm.uuid):
            self._settle_dead(vm, "QEMU exited during a refresh while the agent was down")
            return
        try:
            live = await self._attach(vm, old_pid, timeout=ADOPT_QMP_TIMEOUT)
        except (MonitorError, ProcessLookupError) as exc:
            await self._unanswering(vm, old_pid, exc)
            return
        await migration.resume_if_stopped(live.monitor)
        self._transition(vm, Event.REFRESH_FAILED, reason="refresh interrupted by an agent "
                         "restart; it runs on in its old QEMU")  # fmt: skip

    async def suspend(self, name: str, timeout: float = SUSPEND_TIMEOUT) -> VmRecord:
        """Pause the VM, save its whole state (RAM and devices) to ``suspend.state`` in its
        folder, fsynced, record it ``suspended`` and stop its QEMU; its tap goes too. QEMU's
        migration flushes and lets go of the disk before it reports completion. A start
        (``resume``) brings it back where it was.

        :raise VmStateError: the VM is neither running nor paused.
        :raise VmError: it could not be saved (it runs on, ``cont``).
        """
        async with self._lock(name):
            vm = self.get(name)
            check_action(name, vm.state, Action.SUSPEND)
            live = self._live.get(name)
            if live is None or live.monitor is None or live.watch is None or vm.pid is None:
                raise VmError(f"vm {name}: the agent holds no QMP connection to its QEMU")
            monitor, pid, target = live.monitor, vm.pid, self._files(vm).saved
            try:
                machine = await migration.running_machine(monitor)
            except MonitorError as exc:
                raise VmError(f"cannot suspend vm {name}: {exc.message}") from exc
            vm = self._transition(vm, Event.SUSPEND_REQUESTED, machine=machine, reason=None)
            paused_at = time.time()
            saving: asyncio.Future[int] | None = None
            try:
                await self._drain_status(name, live)  # the ring is not part of the saved state
                await monitor.execute("stop")
                await migration.prepare_source(monitor)
                read = await migration.pipe_to(monitor, "suspend", qemu_writes=True)
                saving = asyncio.ensure_future(asyncio.to_thread(migration.save_stream, read,
                                                                 target))  # fmt: skip
                await monitor.execute("migrate", {"uri": "fd:suspend"})
                await migration.wait_done(monitor, timeout, f"vm {name}: suspend")
                size = await saving
                await asyncio.to_thread(migration.commit, target)
            except (HatcheryError, OSError) as exc:
                why = exc.message if isinstance(exc, HatcheryError) else str(exc)
                with contextlib.suppress(MonitorError):
                    await monitor.execute("migrate_cancel")
                if saving is not None:
                    with contextlib.suppress(OSError):
                        await saving
                migration.partial(target).unlink(missing_ok=True)
                await migration.resume_if_stopped(monitor)
                log.error("vm %s: suspend failed, it runs on: %s", name, why)
                self._transition(self.get(name), Event.SUSPEND_FAILED,
                                 reason=f"suspend failed: {why}")  # fmt: skip
                raise MoveFailed(f"cannot suspend vm {name}: {why}",
                                 hint="it runs on") from exc  # fmt: skip
            # Saved: recorded first (with its PID: a restarted agent stops a QEMU left over)
            vm = self._transition(self.get(name), Event.SUSPENDED, state_file=str(target),
                                  suspended_at=paused_at, pause_seconds=None)  # fmt: skip
            self._live.pop(name, None)
            await live.let_go()
            if not await process.terminate(pid, vm.uuid, grace=KILL_GRACE):
                log.error("vm %s: QEMU pid %s does not exit after its suspend", name, pid)
            await netdev.delete_link(netdev.tap_name(vm.uuid))
            log.info("vm %s: suspended to %s (%d MiB)", name, target, size >> 20)
            return self._save(replace(self.get(name), pid=None))

    async def _resume(self, vm: VmRecord) -> VmRecord:
        """Start a suspended VM from its state file: its tap and port rules made again, QEMU
        started with the same device model and ``-incoming defer``, the file fed to it. If
        that fails, QEMU is killed, the file set aside (``suspend-failed-TIME.state``, kept
        for the operator) and the VM cold-started, the reason in its record."""
        name = vm.name
        uid = vm.uid
        if uid is None:
            uid = sandbox.pick_uid((v.uid for v in self._vms.values()), self._isolation)
        vm = self._transition(vm, Event.RESUME_REQUESTED, uid=uid)
        saved = Path(vm.state_file) if vm.state_file else None
        live, pid, feeding = None, None, None
        try:
            if saved is None or not saved.is_file():
                raise VmError(f"its state file {saved} is missing")
            vm = await self._sized(vm)
            pid = await self._spawn(vm, incoming=True)
            vm = self._save(replace(vm, pid=pid))
            live = await self._attach(vm, pid, incoming=True)
            assert live.monitor is not None
            write = await migration.pipe_to(live.monitor, "resume", qemu_writes=False)
            feeding = asyncio.ensure_future(asyncio.to_thread(migration.feed_stream, saved,
                                                              write))  # fmt: skip
            await live.monitor.execute("migrate-incoming", {"uri": "fd:resume"})
            await migration.wait_done(live.monitor, SUSPEND_TIMEOUT, f"vm {name}: resume")
            await live.monitor.execute("cont")  # it was saved paused, and so it is loaded
            await feeding
        except (HatcheryError, OSError) as exc:
            why = exc.message if isinstance(exc, HatcheryError) else str(exc)
            await self._drop_incoming(vm, live, pid)
            if feeding is not None:
                with contextlib.suppress(OSError):
                    await feeding
            said = _tail(self._files(vm).qemu_log, 2)
            if said and pid is not None:
                why += f" (QEMU: {said})"
            return await self._cold_start_after(vm, saved, why)
        self._live[name] = live
        self._take_next_sockets(self._files(vm))
        saved.unlink(missing_ok=True)  # the guest runs on from it: it must never be loaded again
        pause = time.time() - vm.suspended_at if vm.suspended_at else None
        log.info("vm %s: resumed from %s after %.1fs", name, saved, pause or 0)
        return self._transition(self.get(name), Event.STARTED, state_file=None,
                                suspended_at=None, pause_seconds=pause, reason=None)  # fmt: skip

    async def _cold_start_after(self, vm: VmRecord, saved: Path | None, why: str) -> VmRecord:
        """A resume failed: keep the state file aside and start the VM from its disk or
        kernel as a stopped VM would; the reason stays in its record."""
        kept = None
        if saved is not None and saved.is_file():
            kept = saved.with_name(f"suspend-failed-{int(time.time())}.state")
            os.replace(saved, kept)
        reason = f"resume failed: {why}; cold-started" + (
            f"; its state file is kept as {kept}" if kept else ""
        )
        log.error("vm %s: %s", vm.name, reason)
        vm = self._transition(self.get(vm.name), Event.START_FAILED, pid=None, state_file=None,
                              suspended_at=None, reason=reason)  # fmt: skip
        vm = await self._cold_start(vm)
        return self._save(replace(self.get(vm.name), reason=reason))

    # --- stop -------------------------------------------------------------------------
    async def stop(self, name: str, timeout: float = 30.0, force: bool = False) -> VmRecord:
        """Soft (ACPI power button, up to ``timeout``), then hard (QMP quit, then SIGKILL)."""
        async with self._lock(name):
            vm = self.get(name)
            if vm.state is not VmState.STOPPING:
                check_action(name, vm.state, Action.STOP)
                vm = self._transition(vm, Event.STOP_REQUESTED)
            await self._halt(vm, timeout=0 if force else timeout)
            return self.get(name)

    async def _halt(self, vm: VmRecord, timeout: float) -> None:
        live = self._live.get(vm.name)
        if live is None or live.watch is None or vm.pid is None:
            return
        exited = live.watch.exited
        if timeout > 0 and live.monitor is not None:
            with contextlib.suppress(MonitorError):
                await live.monitor.powerdown()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited.wait(), timeout)
        if not exited.is_set() and live.monitor is not None:
            log.info("vm %s: no soft shutdown, quitting QEMU", vm.name)
            await self._drain_status(vm.name, live)
            live.shutdown_seen = True
            await live.monitor.quit()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited.wait(), 10)
        if not exited.is_set():
            log.warning("vm %s: QEMU still running, killing pid %s", vm.name, vm.pid)
            live.shutdown_seen = True
            process.kill(vm.pid, vm.uuid)
            await asyncio.wait_for(exited.wait(), 10)

    # --- destroy --------------------------------------------------------------------------
    async def destroy(self, name: str) -> None:
        async with self._lock(name):
            vm = self.get(name)
            check_action(name, vm.state, Action.DESTROY)
            vm = self._transition(vm, Event.DESTROY_REQUESTED)
            await self._halt(vm, timeout=0)
            await self._finish_destroy(self.get(name))

    async def _finish_destroy(self, vm: VmRecord) -> None:
        """Kill QEMU if it still runs, then free what the VM held. The address is released
        only once QEMU is gone, so no other VM gets it while this one can still send."""
        if vm.pid is not None and not await process.terminate(vm.pid, vm.uuid, grace=0):
            raise VmError(f"vm {vm.name}: QEMU pid {vm.pid} does not exit; the vm stays "
                          "destroying and keeps its address", hint="destroy it again")  # fmt: skip
        await netdev.delete_link(netdev.tap_name(vm.uuid))
        shutil.rmtree(self._vm_dir(vm.name), ignore_errors=True)
        self._pool.release(ipaddress.IPv4Address(vm.ip), vm.name)
        self._vms.pop(vm.name, None)
        self._live.pop(vm.name, None)
        await self._ports_changed(vm.bridge)
        log.info("vm %s: destroyed, %s returned to the pool", vm.name, vm.ip)

    async def _ports_changed(self, bridge: str) -> None:
        if self._port_rules is not None:
            try:
                await self._port_rules.ports_changed(bridge)
            except HatcheryError as exc:
                raise VmError(f"cannot update the port rules of {bridge}: {exc.message}") from exc

    # --- lookups for the network services ---------------------------------------------
    def on_bridge(self, bridge: str) -> list[VmRecord]:
        return [vm for vm in self._vms.values() if vm.bridge == bridge]

    def by_ip(self, bridge: str, ip: str) -> VmRecord | None:
        return next((v for v in self._vms.values() if v.bridge == bridge and v.ip == ip), None)

    # --- reboots (the upgrade controller's VmControl) -------------------------------------
    def running_names(self) -> list[str]:
        return [vm.name for vm in self.records() if vm.state in (VmState.RUNNING, VmState.PAUSED)]

    async def stop_for_reboot(self, name: str) -> None:
        await self.stop(name, timeout=30)

    def memory_mib(self, names: list[str]) -> int:
        return sum(self._vms[n].memory_mib for n in names if n in self._vms)

    async def restore(self, name: str) -> VmOutcome:
        """Start it again after the reboot; a suspended one is resumed (``start``), and
        cold-started if that fails. What became of it, for the upgrade's report: resumed
        with its measured pause, or cold-started or stopped with the reason.

        :raise VmError: it could not be started at all.
        """
        vm = self._vms.get(name)
        if vm is None:
            return VmOutcome(name, VmResult.STOPPED, reason="it no longer exists")
        if vm.state in (VmState.RUNNING, VmState.PAUSED):  # no QEMU outlives a kexec
            why = f"it was already {vm.state.value} after the boot: started afresh, not resumed"
            return VmOutcome(name, VmResult.COLD_STARTED, reason=why)
        if vm.state not in (VmState.STOPPED, VmState.CRASHED, VmState.SUSPENDED):
            why = f"it was {vm.state.value} after the boot, not restored"
            return VmOutcome(name, VmResult.STOPPED, reason=why)
        suspended, before = vm.state is VmState.SUSPENDED, vm.reason
        after = await self.start(name)
        if suspended and after.state is VmState.RUNNING and after.reason is None:
            return VmOutcome(name, VmResult.RESUMED, pause_seconds=after.pause_seconds)
        if suspended:  # ``_resume`` fell back to a cold start and says why
            why = after.reason or "resume failed; cold-started"
        else:
            why = f"it was {vm.state.value} before the boot, not saved" + (
                f" ({before})" if before else ""
            )
        return VmOutcome(name, VmResult.COLD_STARTED, reason=why)

    async def refresh_for_upgrade(self, name: str) -> VmOutcome:
        """What a live patch with ``refresh_vms`` does to each running VM: ``refresh``, and
        what became of it for the upgrade's report. A VM that cannot be moved runs on in its
        old QEMU (the refresh's own fallback) and is reported ``refresh-failed``."""
        vm = self._vms.get(name)
        if vm is None:
            return VmOutcome(name, VmResult.STOPPED, reason="it no longer exists")
        if vm.state not in (VmState.RUNNING, VmState.PAUSED):
            return VmOutcome(name, VmResult.STOPPED, reason=f"it was {vm.state.value}, not "
                             "refreshed")  # fmt: skip
        try:
            after = await self.refresh(name)
        except (VmError, VmStateError) as exc:
            return VmOutcome(name, VmResult.REFRESH_FAILED,
                             reason=f"{exc.message}; it runs on in its old QEMU")  # fmt: skip
        return VmOutcome(name, VmResult.REFRESHED, pause_seconds=after.pause_seconds)

    async def suspend_for_reboot(self, name: str) -> None:
        """What a reboot upgrade does to each running VM after staging, before the jump
        (``restore`` resumes it after the boot): save it to /data, or stop it softly if
        that fails (``restore`` then cold-starts it; the suspend's failure stays in its
        record for the upgrade's report)."""
        try:
            await self.suspend(name)
        except VmError as exc:
            log.error("vm %s: %s; stopping it for the reboot instead", name, exc.message)
            await self.stop_for_reboot(name)
            vm = self._vms.get(name)
            if vm is not None and vm.state in (VmState.STOPPED, VmState.CRASHED):
                self._save(replace(vm, reason=f"suspend failed: {exc.message}"))

    # --- user data ------------------------------------------------------------------------
    async def set_user_data(self, name: str, user_data: str) -> VmRecord:
        async with self._lock(name):
            return self._save(self.get(name).with_state(self.get(name).state, user_data=user_data))

    # --- shutdown of the agent ------------------------------------------------------------
    async def close(self) -> None:
        """Let go of every VM without stopping it (the agent is exiting or restarting)."""
        if self._trimmer is not None:
            self._trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimmer
            self._trimmer = None
        for live in list(self._live.values()):
            if live.watch is not None:
                live.watch.close()
            if live.monitor is not None:
                await live.monitor.close()
        self._live.clear()
