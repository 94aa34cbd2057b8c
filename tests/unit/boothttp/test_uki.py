"""The streaming UKI assembler: the real systemd stub read back by objdump (a PE reader no
one here wrote), section contents byte for byte, invariants over sizes, and the refusals."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery.boothttp import uki
from tests.conftest import FUZZ_EXAMPLES, missing
from tests.support.pe_stubs import content, synthetic_stub

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
OSREL = 'ID=hatchery\nNAME="Hatchery"\nVERSION_ID=1\n'


def real_stub() -> bytes:
    if not STUB.exists():
        missing(f"{STUB} is not installed (Debian package systemd-boot-efi)")
    return STUB.read_bytes()


def assemble(stub: bytes, cmdline: str, kernel: bytes, initrd: bytes) -> bytes:
    """The image as the server streams it: head, kernel, zeros, initrd, zeros."""
    plan = uki.layout(
        stub, cmdline=cmdline, osrel=OSREL, kernel_size=len(kernel), initrd_size=len(initrd)
    )
    image = plan.head + kernel + bytes(plan.kernel_pad) + initrd + bytes(plan.initrd_pad)
    assert len(image) == plan.size
    return image


@pytest.mark.parametrize(("kernel_size", "initrd_size"), [(1, 0), (512, 511), (3_000_001, 65_537)])
def test_real_stub_read_back_by_objdump(
    tmp_path: Path, require_tool: Callable[[str], str], kernel_size: int, initrd_size: int
) -> None:
    objdump = require_tool("objdump")
    stub = real_stub()
    kernel, initrd = os.urandom(kernel_size), os.urandom(initrd_size)
    cmdline = "console=ttyS0 hatchery.seed=http://10.0.0.1:8443/seed/" + "t" * 43
    image = assemble(stub, cmdline, kernel, initrd)
    found = uki.sections(image)
    # Ours: the bytes of each new section are exactly the inputs.
    assert content(image, found[".linux"]) == kernel
    assert content(image, found[".initrd"]) == initrd
    assert content(image, found[".cmdline"]) == cmdline.encode()
    assert content(image, found[".osrel"]) == OSREL.encode()
    # The stub's own sections are untouched.
    for name, section in uki.sections(stub).items():
        assert found[name] == section
        assert content(image, section) == content(stub, section)

    path = tmp_path / "uki.efi"
    path.write_bytes(image)
    headers = subprocess.run(
        [objdump, "-h", str(path)], capture_output=True, text=True, check=True
    ).stdout
    rows = {
        m[1]: (int(m[2], 16), int(m[3], 16), int(m[4], 16))
        for m in re.finditer(
            r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", headers, re.M
        )
    }
    assert "file format pei-x86-64" in headers
    sizes = {
        ".osrel": len(OSREL),
        ".cmdline": len(cmdline),
        ".linux": kernel_size,
        ".initrd": initrd_size,
    }
    private = subprocess.run(
        [objdump, "-p", str(path)], capture_output=True, text=True, check=True
    ).stdout
    # objdump shows ImageBase + RVA; the stub's ImageBase is 0 in older systemd-boot builds
    # and not in newer ones (254.26 from backports: 0x14df90000).
    image_base = int(re.search(r"ImageBase\s+([0-9a-f]+)", private)[1], 16)  # type: ignore[index]
    for name, size in sizes.items():
        objdump_size, vma, file_offset = rows[name]
        assert objdump_size == size or (size == 0 and objdump_size == 0), name
        assert vma % 0x1000 == 0 and file_offset % 0x200 == 0, name
        assert (vma - image_base, file_offset) == (
            found[name].virtual_address,
            found[name].raw_offset,
        )
    size_of_image = int(re.search(r"SizeOfImage\s+([0-9a-f]+)", private)[1], 16)  # type: ignore[index]
    last = found[".initrd"]
    assert size_of_image >= last.virtual_address + last.virtual_size
    assert re.search(r"CheckSum\s+0+\n", private)


def test_real_stub_layout() -> None:
    """What the real stub looks like, so a new systemd that changes it is noticed."""
    stub = real_stub()
    found = uki.sections(stub)
    assert {".text", ".sdmagic", ".sbat"} <= found.keys()
    assert not {".linux", ".initrd", ".cmdline", ".osrel"} & found.keys()
    image = assemble(stub, "quiet", b"k" * 1000, b"i" * 1000)
    # Debian's stub carries a COFF symbol table after its sections: dropped, fields zeroed.
    assert struct.unpack_from("<II", image, struct.unpack_from("<I", image, 0x3C)[0] + 12) == (0, 0)


@FUZZ
@given(
    kernel_size=st.integers(1, 4 << 20),
    initrd_size=st.integers(0, 4 << 20),
    cmdline=st.text(st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=2047),
    sections=st.integers(1, 6),
    file_alignment=st.sampled_from([0x200, 0x1000]),
    section_alignment=st.sampled_from([0x1000, 0x2000, 0x10000]),
)
def test_layout_invariants(
    kernel_size: int,
    initrd_size: int,
    cmdline: str,
    sections: int,
    file_alignment: int,
    section_alignment: int,
) -> None:
    stub = synthetic_stub(
        sections=sections, file_alignment=file_alignment, section_alignment=section_alignment
    )
    plan = uki.layout(
        stub, cmdline=cmdline, osrel=OSREL, kernel_size=kernel_size, initrd_size=initrd_size
    )
    found = list(uki.sections(plan.head).values())  # the head holds the whole section table
    assert [s.name for s in found[-4:]] == list(uki.NEW_SECTIONS)
    assert [s.virtual_size for s in found[-4:]] == [
        len(OSREL),
        len(cmdline.encode()),
        kernel_size,
        initrd_size,
    ]
    for s in found[-4:]:
        assert s.virtual_address % max(section_alignment, 0x1000) == 0
        assert s.raw_offset % file_alignment == 0 and s.raw_size % file_alignment == 0
        assert s.raw_size >= s.virtual_size
    for a, b in zip(found, found[1:], strict=False):
        assert a.virtual_address + max(a.virtual_size, a.raw_size, 1) <= b.virtual_address
        assert a.raw_offset + a.raw_size <= b.raw_offset
    size_of_image = struct.unpack_from("<I", plan.head, 0x40 + 24 + 56)[0]
    assert size_of_image % section_alignment == 0
    assert size_of_image >= found[-1].virtual_address + found[-1].virtual_size
    assert plan.size == found[-1].raw_offset + found[-1].raw_size
    assert len(plan.head) == found[-2].raw_offset
    assert plan.head[found[-3].raw_offset :].rstrip(b"\0") == cmdline.encode().rstrip(b"\0")
    assert plan.kernel_pad == found[-2].raw_size - kernel_size


def test_synthetic_stub_contents() -> None:
    stub = synthetic_stub()
    image = assemble(stub, "a b c", b"K" * 700, b"I" * 3)
    found = uki.sections(image)
    assert content(image, found[".s0"]) == b"\x01" * 100
    assert content(image, found[".linux"]) == b"K" * 700
    assert content(image, found[".initrd"]) == b"III"


@pytest.mark.parametrize(
    ("stub", "message"),
    [
        (b"", "no MZ"),
        (b"\x7fELF" + bytes(200), "no MZ"),
        (synthetic_stub()[:0x40], "PE signature"),
        (synthetic_stub(magic=0x10B), "not a PE32+"),
        (synthetic_stub(machine=0x14C), "not an x86-64"),
        (synthetic_stub(sections=14), "no room for 4 more section headers"),
        (synthetic_stub(size_of_headers=0x200, sections=1), "no room"),
        (synthetic_stub(signed=True), "signed"),
        (synthetic_stub(trailer=b"debug data"), "not a symbol table"),
        (synthetic_stub()[:-1], "truncated"),
        (synthetic_stub(file_alignment=0x300), "not a power of two"),
    ],
)
def test_refusals(stub: bytes, message: str) -> None:
    with pytest.raises(uki.UkiError, match=message):
        uki.layout(stub, cmdline="", osrel="", kernel_size=1, initrd_size=0)


def test_refuses_nul_in_cmdline_and_bad_sizes() -> None:
    stub = synthetic_stub()
    with pytest.raises(uki.UkiError, match="NUL"):
        uki.layout(stub, cmdline="a\0b", osrel="", kernel_size=1, initrd_size=0)
    with pytest.raises(uki.UkiError, match="not valid text"):
        uki.layout(stub, cmdline="", osrel="\ud800", kernel_size=1, initrd_size=0)
    for cmdline in ("hatchery.seed=café", "x" * 2048, "a\ud800"):
        with pytest.raises(uki.UkiError, match="must be ASCII and at most 2047 bytes"):
            uki.layout(stub, cmdline=cmdline, osrel="", kernel_size=1, initrd_size=0)
    assert uki.layout(stub, cmdline="x" * 2047, osrel="", kernel_size=1, initrd_size=0).size
    with pytest.raises(uki.UkiError, match="bad sizes"):
        uki.layout(stub, cmdline="", osrel="", kernel_size=0, initrd_size=0)
    with pytest.raises(uki.UkiError, match="4 GiB"):
        uki.layout(stub, cmdline="", osrel="", kernel_size=3 << 30, initrd_size=2 << 30)


def test_zero_padding_after_table_is_required() -> None:
    stub = bytearray(synthetic_stub())
    stub[0x40 + 24 + 240 + 2 * 40 + 5] = 1
    with pytest.raises(uki.UkiError, match="not empty"):
        uki.layout(bytes(stub), cmdline="", osrel="", kernel_size=1, initrd_size=0)


@FUZZ
@given(st.binary(max_size=2048))
def test_sections_of_random_bytes(data: bytes) -> None:
    try:
        uki.sections(data)
    except uki.UkiError:
        pass


@FUZZ
@given(st.data())
def test_layout_of_mutated_stub(data: st.DataObject) -> None:
    """A corrupted stub is refused with UkiError or laid out, never anything else."""
    stub = bytearray(synthetic_stub(trailer=bytes(64)))
    for _ in range(data.draw(st.integers(1, 8))):
        stub[data.draw(st.integers(0, 0x200))] = data.draw(st.integers(0, 255))
    try:
        uki.layout(bytes(stub), cmdline="x", osrel="y", kernel_size=10, initrd_size=10)
    except uki.UkiError:
        pass


def test_header_area_exactly_full() -> None:
    """13 headers + 4 new ones fill the 696 bytes between the table and SizeOfHeaders."""
    plan = uki.layout(
        synthetic_stub(sections=13), cmdline="", osrel="", kernel_size=1, initrd_size=0
    )
    assert len(uki.sections(plan.head)) == 17


PEFILE_REPORT = """
import json, sys, pefile
pe = pefile.PE(sys.argv[1])
rows = [[s.Name.rstrip(b"\\0").decode(), s.Misc_VirtualSize,
         s.get_data()[: s.Misc_VirtualSize].hex()[:64]] for s in pe.sections]
print(json.dumps({"warnings": pe.get_warnings(), "image": pe.OPTIONAL_HEADER.SizeOfImage,
                  "sections": rows}))
"""


def test_pefile_finds_nothing_new_to_warn_about(tmp_path: Path) -> None:
    """Debian's python3-pefile (another PE reader) sees the stub's warnings and no more."""
    if subprocess.run(["/usr/bin/python3", "-c", "import pefile"], capture_output=True).returncode:
        missing("python3-pefile is not installed")
    stub = real_stub()
    (tmp_path / "stub.efi").write_bytes(stub)
    (tmp_path / "uki.efi").write_bytes(assemble(stub, "quiet", b"\x4d\x5a" * 999, b"\x07" * 5))

    def report(name: str) -> dict[str, Any]:
        out = subprocess.run(
            ["/usr/bin/python3", "-c", PEFILE_REPORT, str(tmp_path / name)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result: dict[str, Any] = json.loads(out)
        return result

    before, after = report("stub.efi"), report("uki.efi")
    assert after["warnings"] == before["warnings"]
    assert after["sections"][:-4] == before["sections"]
    assert after["sections"][-4:] == [
        [".osrel", len(OSREL), OSREL.encode().hex()[:64]],
        [".cmdline", 5, b"quiet".hex()],
        [".linux", 1998, (b"\x4d\x5a" * 16).hex()],
        [".initrd", 5, (b"\x07" * 5).hex()],
    ]
    assert after["image"] > before["image"]
