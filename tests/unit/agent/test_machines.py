"""Versioned machine types (issue 16): aliases resolved as the QEMU that runs them names them."""

from __future__ import annotations

import pytest

from hatchery.qemu.machines import (
    MachineError,
    from_qom_type,
    is_versioned,
    parse_aliases,
    resolve,
)

# ``qemu-system-x86_64 -machine help`` of Debian bookworm's QEMU 7.2 (cut short)
HELP_7_2 = """Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-7.1           Standard PC (Q35 + ICH9, 2009)
isapc                ISA-only PC
none                 empty machine
"""
# and of a newer one (bookworm-backports' QEMU 10), whose aliases point further
HELP_10_0 = HELP_7_2.replace("alias of pc-q35-7.2", "alias of pc-q35-10.0").replace(
    "alias of pc-i440fx-7.2", "alias of pc-i440fx-10.0"
)


def test_aliases_resolve_to_the_running_qemus_newest_machine() -> None:
    assert parse_aliases(HELP_7_2) == {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}
    assert resolve("q35", parse_aliases(HELP_7_2)) == "pc-q35-7.2"
    assert resolve("pc", parse_aliases(HELP_7_2)) == "pc-i440fx-7.2"


def test_a_versioned_machine_is_kept_whatever_the_qemu() -> None:
    """A record made on 7.2 keeps pc-q35-7.2 on a node whose QEMU's q35 means 10.0: that is
    what lets a newer QEMU resume the guest."""
    assert resolve("pc-q35-7.2", parse_aliases(HELP_10_0)) == "pc-q35-7.2"
    assert resolve("q35", parse_aliases(HELP_10_0)) == "pc-q35-10.0"
    assert is_versioned("pc-q35-7.2") and not is_versioned("q35") and not is_versioned("pc")


def test_an_alias_the_qemu_does_not_name_is_an_error() -> None:
    with pytest.raises(MachineError, match="no versioned machine for 'q35'"):
        resolve("q35", parse_aliases("Supported machines are:\nnone  empty machine\n"))


def test_running_machine_from_qom_type() -> None:
    assert from_qom_type("pc-q35-7.2-machine") == "pc-q35-7.2"
