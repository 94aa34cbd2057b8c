"""Host network plumbing for VMs through pyroute2: bridges must exist, taps come and go.

Taps are created persistent *before* QEMU starts and attached to the VM's bridge, so the
agent knows each VM's port by name (anti-spoofing rules and metadata identity hang off it)
and a VM keeps its port while the agent restarts.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hatchery.errors import HatcheryError

log = logging.getLogger(__name__)


class NetdevError(HatcheryError):
    """A bridge or tap cannot be set up."""


def tap_name(vm_uuid: str) -> str:
    """``hv-`` + 12 hex digits of the VM's UUID: unique and within IFNAMSIZ (15)."""
    return "hv-" + vm_uuid.replace("-", "")[:12]


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
