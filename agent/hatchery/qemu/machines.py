"""Versioned machine types: what a VM's record keeps so any later QEMU builds the same machine.

``q35`` and ``pc`` are aliases that each QEMU release points at its newest machine
(``pc-q35-7.2`` on QEMU 7.2, ``pc-q35-10.0`` on QEMU 10). A guest saved by one release can be
resumed by a newer one only on the *same* versioned machine, so a VM's record keeps the
versioned name, resolved from the QEMU that creates it (or, for a record that an older agent
wrote with an alias, from the QEMU that runs it, or the one that starts it next).
"""

from __future__ import annotations

import re

from hatchery import host
from hatchery.errors import CommandError, HatcheryError
from hatchery.qemu.cmdline import MACHINES

#: ``q35   Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)`` in ``-machine help``
_ALIAS = re.compile(r"^(?P<name>\S+)\s.*\(alias of (?P<target>[\w.-]+)\)\s*$")


class MachineError(HatcheryError):
    """The machine type cannot be resolved to a versioned one."""


def is_versioned(machine: str) -> bool:
    """Whether ``machine`` names one release's machine (not an alias such as ``q35``)."""
    return machine not in MACHINES


def parse_aliases(help_text: str) -> dict[str, str]:
    """Alias → versioned machine, from ``qemu-system-x86_64 -machine help``."""
    found: dict[str, str] = {}
    for line in help_text.splitlines():
        match = _ALIAS.match(line.strip())
        if match:
            found[match["name"]] = match["target"]
    return found


def resolve(machine: str, aliases: dict[str, str]) -> str:
    """The versioned machine ``machine`` stands for (itself if it is versioned already).

    :raise MachineError: an alias this QEMU does not know.
    """
    if is_versioned(machine):
        return machine
    try:
        return aliases[machine]
    except KeyError:
        raise MachineError(f"QEMU names no versioned machine for {machine!r}") from None


def from_qom_type(type_name: str) -> str:
    """A running QEMU's machine from its QOM type (``pc-q35-7.2-machine`` → ``pc-q35-7.2``)."""
    return type_name.removesuffix("-machine")


async def versioned(binary: str, machine: str) -> str:
    """``machine`` resolved by ``binary``'s own list, read each time (a live patch may have
    replaced the binary since; it is a create's or a start's only, and quick).

    :raise MachineError: the list cannot be read or does not name ``machine``.
    """
    if is_versioned(machine):
        return machine
    try:
        out = await host.run_async([binary, "-machine", "help"], timeout=30)
    except CommandError as exc:
        raise MachineError(f"cannot list QEMU's machine types: {exc.message}") from exc
    return resolve(machine, parse_aliases(out.stdout))
