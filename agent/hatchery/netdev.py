"""Host network plumbing for VMs through pyroute2: bridges must exist, taps come and go.

Taps are created persistent *before* QEMU starts and attached to the VM's bridge, so the
agent knows each VM's port by name (anti-spoofing rules and metadata identity hang off it)
and a VM keeps its port while the agent restarts.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import struct
from pathlib import Path

from hatchery.errors import HatcheryError
from hatchery.netlink import IPRoute, NetlinkError

log = logging.getLogger(__name__)


class NetdevError(HatcheryError):
    """A bridge or tap cannot be set up."""


def tap_name(vm_uuid: str) -> str:
    """``hv-`` + 12 hex digits of the VM's UUID: unique and within IFNAMSIZ (15)."""
    return "hv-" + vm_uuid.replace("-", "")[:12]


def interface_mac(name: str) -> str:
    """The MAC address of interface ``name`` (``aa:bb:...``), read from sysfs.

    :raise NetdevError: there is no such interface.
    """
    try:
        return Path(f"/sys/class/net/{name}/address").read_text().strip()
    except OSError as exc:
        raise NetdevError(f"no interface {name}: {exc.strerror}") from exc


def link_index(ipr: IPRoute, name: str) -> int | None:
    """The interface index of ``name`` as ``ipr`` (a namespace's IPRoute) sees it; None when
    there is no such link (pyroute2 answers an empty list rather than raising)."""
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _tap_owner(ipr: IPRoute, index: int) -> int | None:
    """The uid a tap belongs to (``IFLA_TUN_OWNER``); None when it has none (or is no tap)."""
    info = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    owner = data.get_attr("IFLA_TUN_OWNER") if data is not None else None
    return int(owner) if owner is not None else None


def _ensure_tap(tap: str, bridge: str, owner: int | None) -> None:
    with IPRoute() as ipr:
        master = link_index(ipr, bridge)
        if master is None:
            raise NetdevError(
                f"bridge {bridge} does not exist", hint="create it or fix the agent's config"
            )
        index = link_index(ipr, tap)
        if index is not None and _tap_owner(ipr, index) != owner:
            # made for another uid (an older agent, other settings): a stopped VM's tap
            # carries nothing, so it is made again rather than handed over
            log.info("tap %s: owner is not %s, recreating it", tap, owner)
            ipr.link("del", index=index)
            index = None
        if index is None:
            owned = {"uid": owner, "gid": owner} if owner is not None else {}
            try:
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap", **owned)
            except NetlinkError as exc:
                raise NetdevError(f"cannot create tap {tap}: {exc}") from exc
            index = link_index(ipr, tap)
            if index is None:
                raise NetdevError(f"tap {tap} vanished right after creation")
        ipr.link("set", index=index, master=master, state="up")


# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def open_tap(tap: str) -> int:
    """Attach to the persistent tap ``tap`` and return the descriptor, for QEMU
    (``-netdev tap,fd=N``): QEMU then needs neither /dev/net/tun nor CAP_NET_ADMIN, as
    libvirt does it. The flags are the ones QEMU itself asks for.

    :raise NetdevError: the tap cannot be attached (missing, or attached already).
    """
    fd = -1
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        ifr = struct.pack("16sH", tap.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        raise NetdevError(f"cannot attach to tap {tap}: {exc.strerror or exc}") from exc
    return fd


_TUNGETIFF = 0x800454D2
_TUNGETVNETHDRSZ = 0x800454D7
_TUNSETVNETHDRSZ = 0x400454D8
_SYS_PIDFD_GETFD = 438  # x86_64, Linux >= 5.6; Python's os has no wrapper
_libc = ctypes.CDLL(None, use_errno=True)


def attached_tap(fd: int) -> str:
    """The name of the tap the descriptor ``fd`` is attached to (``TUNGETIFF``): the
    kernel's answer, whatever the process that held it claims."""
    out = fcntl.ioctl(fd, _TUNGETIFF, struct.pack("16sH", b"", 0))
    return out[:16].rstrip(b"\0").decode()


def vnet_hdr_size(fd: int) -> int:
    """The virtio-net header size of the tap behind ``fd`` (one setting for the device)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, _TUNGETVNETHDRSZ, struct.pack("i", 0)))[0])


def set_vnet_hdr_size(fd: int, size: int) -> None:
    fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", size))


def take_tap_fd(pid: int, tap: str) -> int:
    """A descriptor for the very queue of ``tap`` that process ``pid`` (a running QEMU)
    holds, copied out of it with ``pidfd_getfd`` (the agent, root, may), for the QEMU that
    replaces it (``vm refresh``).

    Why a copy and not a second open: a tap made without ``IFF_MULTI_QUEUE`` takes one
    attachment only (a second ``TUNSETIFF`` fails with ``EBUSY`` while QEMU holds it), and
    a multi-queue tap would spread the host's frames over both processes' queues while one
    of them is paused. The copy is the same open file: the new QEMU reads what the old one
    stops reading, and nothing is lost in between but what the guest's pause holds up.

    The descriptor is found by the kernel's ``/proc/PID/fdinfo`` (``iff:``) and checked
    with ``TUNGETIFF`` on the copy: a hostile QEMU cannot hand over anything but its tap.

    :raise NetdevError: no descriptor of ``pid`` is attached to ``tap``.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise NetdevError(f"cannot reach QEMU pid {pid}: {exc.strerror}") from exc
    try:
        for info in sorted(Path(f"/proc/{pid}/fdinfo").iterdir(), key=lambda p: int(p.name)):
            try:
                if f"iff:\t{tap}\n" not in info.read_text():
                    continue
            except OSError:
                continue
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(info.name), 0)
            if fd < 0:
                code = ctypes.get_errno()
                raise NetdevError(f"cannot take tap {tap} from QEMU pid {pid}: "
                                  f"{os.strerror(code)}")  # fmt: skip
            try:
                if attached_tap(fd) == tap:
                    return int(fd)
            except OSError:
                pass
            os.close(fd)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise NetdevError(f"cannot read the descriptors of pid {pid}: {exc}") from exc
    finally:
        os.close(pidfd)
    raise NetdevError(f"QEMU pid {pid} holds no descriptor of tap {tap}")


def _delete(name: str) -> None:
    with IPRoute() as ipr:
        index = link_index(ipr, name)
        if index is not None:
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                log.warning("cannot delete %s: %s", name, exc)


async def ensure_tap(tap: str, bridge: str, owner: int | None = None) -> None:
    """The tap exists, on ``bridge``, up, and belongs to ``owner`` (uid and gid; None: no
    owner, for a QEMU running as root). A tap with an owner can be attached by that uid
    only (or with CAP_NET_ADMIN); one without can be attached by anyone who can open
    /dev/net/tun, so another VM's QEMU could take a stopped VM's port."""
    await asyncio.to_thread(_ensure_tap, tap, bridge, owner)


async def delete_link(name: str) -> None:
    await asyncio.to_thread(_delete, name)


def _local_addresses() -> set[str]:
    with IPRoute() as ipr:
        found = set()
        for msg in ipr.get_addr():
            for attr in ("IFA_LOCAL", "IFA_ADDRESS"):
                value = msg.get_attr(attr)
                if value:
                    found.add(str(value))
        return found


async def local_addresses() -> set[str]:
    """Every address on the node's interfaces (in the agent's namespace), read now: what a
    URL the agent fetches for a tenant must never reach."""
    return await asyncio.to_thread(_local_addresses)
