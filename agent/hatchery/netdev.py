"""Host network plumbing for VMs through pyroute2: bridges must exist, taps come and go.

Taps are created persistent *before* QEMU starts and attached to the VM's bridge, so the
agent knows each VM's port by name (anti-spoofing rules and metadata identity hang off it)
and a VM keeps its port while the agent restarts.
"""

from __future__ import annotations

import asyncio
import logging

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


def _ensure_tap(tap: str, bridge: str) -> None:
    with IPRoute() as ipr:
        master = link_index(ipr, bridge)
        if master is None:
            raise NetdevError(
                f"bridge {bridge} does not exist", hint="create it or fix the agent's config"
            )
        index = link_index(ipr, tap)
        if index is None:
            try:
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
            except NetlinkError as exc:
                raise NetdevError(f"cannot create tap {tap}: {exc}") from exc
            index = link_index(ipr, tap)
            if index is None:
                raise NetdevError(f"tap {tap} vanished right after creation")
        ipr.link("set", index=index, master=master, state="up")


def _delete(name: str) -> None:
    with IPRoute() as ipr:
        index = link_index(ipr, name)
        if index is not None:
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                log.warning("cannot delete %s: %s", name, exc)


async def ensure_tap(tap: str, bridge: str) -> None:
    await asyncio.to_thread(_ensure_tap, tap, bridge)


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
