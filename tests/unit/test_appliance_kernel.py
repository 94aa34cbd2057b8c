"""The appliance kernel's configuration check: a fragment option Kconfig dropped fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from hatchery_lab import appliance_kernel
from hatchery_lab.appliance_kernel import (
    FRAGMENT,
    config_mismatches,
    inputs_key,
    patches,
    wanted_options,
)


def test_the_fragment_asks_for_what_the_appliance_boots_with() -> None:
    wanted = wanted_options()
    for option in (
        "CONFIG_PVH",  # QEMU -kernel vmlinux: direct 64-bit entry
        "CONFIG_VIRTIO_PCI",
        "CONFIG_VIRTIO_NET",
        "CONFIG_SERIAL_8250_CONSOLE",
        "CONFIG_RD_LZ4",  # the root is an LZ4 cpio
        "CONFIG_ACPI_BUTTON",  # soft stop
        "CONFIG_PACKET",  # udhcpc
    ):
        assert wanted[option] == "y", option
    assert wanted["CONFIG_MODULES"] is None  # everything built in


def test_a_dropped_or_changed_option_is_named(tmp_path: Path) -> None:
    fragment = tmp_path / "f.config"
    fragment.write_text("# comment\nCONFIG_A=y\nCONFIG_B=64\n# CONFIG_C is not set\nCONFIG_D=y\n")
    final = "CONFIG_A=y\nCONFIG_B=32\nCONFIG_C=y\n# CONFIG_D is not set\n"
    assert config_mismatches(wanted_options(fragment), final) == [
        "CONFIG_B: wanted 64, got 32",
        "CONFIG_C: wanted unset, got y",
        "CONFIG_D: wanted y, got unset",
    ]
    assert config_mismatches(wanted_options(fragment), "CONFIG_A=y\nCONFIG_B=64\nCONFIG_D=y") == []


def test_the_fragment_lives_with_the_appliance_image() -> None:
    # Its content is an input of the appliance image's build hash (images/appliance-vm/).
    assert FRAGMENT.parent.name == "appliance-vm"


def test_the_patches_apply_in_name_order_and_key_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "0002-b.patch").write_text("b")
    (tmp_path / "0001-a.patch").write_text("a")
    (tmp_path / "notes.txt").write_text("not a patch")
    assert [p.name for p in patches(tmp_path)] == ["0001-a.patch", "0002-b.patch"]
    # a changed patch is a new kernel: the cache key moves with it
    deb = tmp_path / "source.deb"
    deb.write_bytes(b"the source package")
    monkeypatch.setattr(appliance_kernel, "PATCHES", tmp_path)
    before = inputs_key(deb)
    (tmp_path / "0002-b.patch").write_text("b, changed")
    assert inputs_key(deb) != before
    monkeypatch.undo()
    # the one we carry explains itself and touches only what its header names
    (ours,) = patches()
    text = ours.read_text()
    assert text.index("--- a/arch/x86/mm/init.c") > text.index("self-modifying code")
    assert text.count("\n--- a/") == 1
