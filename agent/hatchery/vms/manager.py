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
from hatchery.qemu.accel import Accel, AccelChoice
from hatchery.qemu.cmdline import DEFAULT_MACHINE, DirectKernel, GuestSpec, Nic, build_argv
from hatchery.vms import process, sandbox
from hatchery.vms.model import (
    NAME_RE,
    Action,
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

log = logging.getLogger(__name__)

METADATA_URL = "http://169.254.169.254/nocloud/"
LIVE_STATES = (VmState.STARTING, VmState.RUNNING, VmState.STOPPING)
#: Seconds a QEMU that does not answer QMP gets between SIGTERM and SIGKILL.
KILL_GRACE = 5.0
#: Seconds a running QEMU gets to answer QMP when the agent re-adopts it (it answers at once).
ADOPT_QMP_TIMEOUT = 10.0


class VmError(HatcheryError):
    """A VM request that cannot be done."""


class NotFound(VmError):
    """No VM of that name."""


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


#: QEMU's seccomp filter for every VM: no obsolete system calls, no setuid/setgid or new
#: sessions, no fork/exec (QEMU needs none of them: the agent makes the taps, ``script=no``),
#: no changes of scheduling or CPU affinity. A guest that escapes into QEMU finds these shut.
#: (It is why QEMU is not started with ``-daemonize``: see ``process.launch``.)
SANDBOX = ("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")


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
        elif vm.state in LIVE_STATES or vm.state is VmState.PAUSED:
            if alive:
                assert vm.pid is not None
                try:
                    await self._attach(vm, vm.pid, timeout=ADOPT_QMP_TIMEOUT)
                except (MonitorError, ProcessLookupError) as exc:
                    await self._unanswering(vm, vm.pid, exc)
                    return
                log.info("vm %s: re-adopted running QEMU pid %s", vm.name, vm.pid)
                if vm.state is VmState.STARTING:
                    self._transition(vm, Event.STARTED)
                elif vm.state is VmState.STOPPING:
                    asyncio.create_task(self.stop(vm.name), name=f"resume-stop-{vm.name}")
            else:
                self._settle_dead(vm, "QEMU exited while the agent was down")

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
        async with self._lock(req.name):
            vm = self._reserve(req)
            try:
                if req.disk_boot is not None:
                    vm = replace(vm, disk_boot=await self._make_volume(vm, req.disk_boot))
                if req.kernel_boot is not None:
                    vm = replace(vm, kernel_boot=await self._fetch_kernel(vm.name, req.kernel_boot))
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
                labels=dict(req.labels),
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

    async def _make_volume(self, vm: VmRecord, disk: DiskRequest) -> DiskBoot:
        """The root volume, converted from the image copied into the VM's folder.

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
        return DiskBoot(str(disk.image), disk.format)

    # --- start ----------------------------------------------------------------------------
    def _argv(self, vm: VmRecord, tap_fd: int) -> list[str]:
        """QEMU's command line: every path relative to the VM's folder, QEMU's working
        directory (``sandbox``); the tap as the descriptor ``tap_fd`` the agent opened."""
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
            "-chardev",
            f"socket,id=console,path={files.rel(files.console)},server=on,wait=off,"
            f"logfile={files.rel(files.console_log)},logappend=on",
        ]  # fmt: skip
        if vm.disk_boot is not None:
            extra += [
                "-drive", f"file={files.rel(files.disk)},if=virtio,format=qcow2,cache=none",
            ]  # fmt: skip
        spec = GuestSpec(
            name=vm.name,
            accel=self._accel,
            memory_mib=vm.memory_mib,
            vcpus=vm.vcpus,
            machine=vm.machine,
            boot=boot,
            nics=(Nic(netdev.tap_name(vm.uuid), vm.mac, fd=tap_fd),),
            serial="chardev:console",
            qmp_socket=Path(files.rel(files.qmp)),
            smbios=(
                f"type=1,manufacturer=Hatchery,product=Hatchery VM,uuid={vm.uuid},"
                f"serial=ds=nocloud-net;s={METADATA_URL}",
            ),
            extra=tuple(extra),
        )
        return build_argv(spec, self._qemu)

    def _user(self, vm: VmRecord) -> sandbox.QemuUser | None:
        """Who its QEMU runs as: its own uid, or root where the node does not allow that."""
        if vm.uid is None or not self._isolation.unprivileged:
            return None
        return sandbox.qemu_user(vm.uid)

    async def start(self, name: str) -> VmRecord:
        async with self._lock(name):
            vm = self.get(name)
            check_action(name, vm.state, Action.START)
            uid = vm.uid  # picked and saved with no await between: no two VMs get one uid
            if uid is None:
                uid = sandbox.pick_uid((v.uid for v in self._vms.values()), self._isolation)
            vm = self._transition(vm, Event.START_REQUESTED, reason=None, uid=uid)
            files, user = self._files(vm), self._user(vm)
            tap = netdev.tap_name(vm.uuid)
            tap_fd: int | None = None
            try:
                await asyncio.to_thread(sandbox.prepare, files, user)
                await netdev.ensure_tap(tap, vm.bridge, owner=user.uid if user else None)
                await self._ports_changed(vm.bridge)
                tap_fd = netdev.open_tap(tap)
                pid = await process.launch(
                    self._argv(vm, tap_fd),
                    f"hatchery-vm-{name}",
                    qmp=files.qmp,
                    output=files.qemu_log,
                    cwd=files.dir,
                    user=user,
                    pass_fds=(tap_fd,),
                )
            except HatcheryError as exc:
                self._transition(vm, Event.START_FAILED, reason=f"start failed: {exc.message}")
                raise VmError(f"cannot start vm {name}: {exc.message}") from exc
            finally:
                if tap_fd is not None:
                    os.close(tap_fd)  # QEMU holds its own copy
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

    async def _attach(self, vm: VmRecord, pid: int, timeout: float = 30.0) -> None:
        """Connect QMP (within ``timeout``: a QEMU that was just started may still be
        loading its kernel) and watch the process's exit."""
        live = _Live()
        self._live[vm.name] = live

        def on_event(kind: str, data: dict[str, Any]) -> None:
            self._on_qmp_event(vm.name, kind, data)

        live.watch = process.ExitWatch(pid, lambda: self._on_exit(vm.name))
        owners = sandbox.socket_owners(vm.uid)
        live.monitor = Monitor(vm.name, self._files(vm).qmp, on_event, owners)
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

    def _on_qmp_event(self, name: str, kind: str, data: dict[str, Any]) -> None:
        vm = self._vms.get(name)
        live = self._live.get(name)
        if vm is None or live is None:
            return
        if kind == "SHUTDOWN":
            live.shutdown_seen = True
        elif kind == "STOP" and vm.state is VmState.RUNNING:
            self._transition(vm, Event.PAUSED, reason="paused by QEMU")
        elif kind == "RESUME" and vm.state is VmState.PAUSED:
            self._transition(vm, Event.RESUMED, reason=None)
        elif kind == "RESET":
            log.info("vm %s: guest reset (reboot)", name)

    def _on_exit(self, name: str) -> None:
        live = self._live.pop(name, None)
        vm = self._vms.get(name)
        if vm is None:
            return
        if live is not None and live.monitor is not None:
            asyncio.create_task(live.monitor.close(), name=f"qmp-close-{name}")
        clean = live is not None and live.shutdown_seen
        event = Event.STOPPED if clean else Event.DIED
        reason = None if clean or vm.state is VmState.STOPPING else "QEMU exited unexpectedly"
        if vm.state is VmState.STARTING and not clean:  # it gave up while initialising
            event, reason = Event.START_FAILED, self._start_failure(name)
        with contextlib.suppress(VmStateError):
            self._transition(vm, event, pid=None, reason=reason)
        if reason:
            log.error("vm %s: %s", name, reason)
        asyncio.create_task(netdev.delete_link(netdev.tap_name(vm.uuid)), name=f"untap-{name}")

    def _start_failure(self, name: str) -> str:
        """Why QEMU gave up while starting: the end of its own output."""
        log_path = sandbox.VmFiles(self._vm_dir(name)).qemu_log  # the agent's file, not QEMU's
        return "start failed: " + (_tail(log_path) or "QEMU exited")

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

    async def restore(self, name: str) -> None:
        vm = self._vms.get(name)
        if vm is not None and vm.state in (VmState.STOPPED, VmState.CRASHED):
            await self.start(name)

    # --- user data ------------------------------------------------------------------------
    async def set_user_data(self, name: str, user_data: str) -> VmRecord:
        async with self._lock(name):
            return self._save(self.get(name).with_state(self.get(name).state, user_data=user_data))

    # --- shutdown of the agent ------------------------------------------------------------
    async def close(self) -> None:
        """Let go of every VM without stopping it (the agent is exiting or restarting)."""
        for live in list(self._live.values()):
            if live.watch is not None:
                live.watch.close()
            if live.monitor is not None:
                await live.monitor.close()
        self._live.clear()
