"""A Unified Kernel Image (UKI) laid out for streaming: systemd's EFI stub plus four sections.

For HTTPS boot the firmware downloads ONE EFI executable: systemd's stub
(``linuxx64.efi.stub``, or ``linuxaa64.efi.stub`` on arm64) with ``.osrel``, ``.cmdline``,
``.linux`` (the kernel's bzImage, or arm64's bare ``Image``: both EFI executables) and
``.initrd`` sections appended, so the TLS connection authenticates the kernel, the initrd and
the command line together. The command line carries a single-use seed token, so every
request gets a different image, and the kernel and initrd are files of up to ~150 MB: the
image is never built in memory or on disk. :func:`layout` computes where everything goes and
returns only the small ``head`` (the stub with its new section headers, ``.osrel`` and
``.cmdline``); the server sends ``head``, the kernel file, ``kernel_pad`` zero bytes, the
initrd file and ``initrd_pad`` zero bytes, ``UkiLayout.size`` bytes in all.

The PE/COFF rules followed (Microsoft's "PE Format" specification; section numbers from it):

- the DOS header's ``e_lfanew`` (offset 0x3c) points at ``PE\\0\\0``, then the COFF file
  header (3.3) and the PE32+ optional header (3.4, magic 0x20b), then the section table (4);
- new section headers must fit in the header area: after the existing table, before
  ``SizeOfHeaders`` and before the first section's raw data (we never move the stub's code);
- a new section's ``VirtualAddress`` is a multiple of ``SectionAlignment`` (and of the 4 KiB
  page, so the kernel sits page-aligned in memory) above everything the stub maps;
  ``PointerToRawData`` and ``SizeOfRawData`` are multiples of ``FileAlignment``;
  ``VirtualSize`` is the true size (systemd's stub reads each section's length from it, and
  the loader zero-fills from the raw size up to it);
- ``NumberOfSections``, ``SizeOfImage`` and ``SizeOfInitializedData`` are updated.

Data after the stub's last section is handled explicitly: Debian's stub is built with objcopy
and keeps a COFF symbol table there (``PointerToSymbolTable``, deprecated for images, 3.3),
which nothing at boot reads; it is dropped and its header fields zeroed. Debian's arm64 stub
(bookworm, systemd 252, built through gnu-efi's objcopy route) has ``.sbat``, ``.sdmagic``
and dynamic symbols there, outside any declared section, which no loader maps: dropped too;
its header area is padded with AArch64 NOPs rather than zeros (the entry point is in
``.text``, so nothing runs them), and the new section headers may overwrite them. A signed stub
(a certificate table, data directory 4) is refused, since appending sections breaks the
signature, and so is any other trailing data we cannot account for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hatchery.errors import HatcheryError

MACHINE_AMD64 = 0x8664
MACHINE_ARM64 = 0xAA64
#: The stubs' machines we assemble for (COFF Machine field, PE Format 3.3.1), by our names.
MACHINES = {MACHINE_AMD64: "x86-64", MACHINE_ARM64: "arm64"}
PE32PLUS_MAGIC = 0x20B
SECTION_HEADER = struct.Struct("<8sIIIIIIHHI")  # 40 bytes, PE Format section 4
COFF_HEADER = struct.Struct("<HHIIIHH")  # 20 bytes, section 3.3
SYMBOL_SIZE = 18  # one COFF symbol table record, section 5.4
#: IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ: what ukify and objcopy give them too.
DATA_READ = 0x0000_0040 | 0x4000_0000
PAGE = 0x1000
#: x86 Linux's COMMAND_LINE_SIZE (2048) less the terminating NUL: the bzImage's cmdline_size
#: (arm64's COMMAND_LINE_SIZE is 2048 too).
MAX_CMDLINE = 2047
_U32 = 0xFFFF_FFFF
# Field offsets inside the PE32+ optional header (section 3.4).
_OPT_SIZE_OF_INIT_DATA = 8
_OPT_SECTION_ALIGNMENT = 32
_OPT_FILE_ALIGNMENT = 36
_OPT_SIZE_OF_IMAGE = 56
_OPT_SIZE_OF_HEADERS = 60
_OPT_CHECKSUM = 64
_OPT_NUMBER_OF_RVA = 108
_OPT_DATA_DIRECTORIES = 112
_DIR_SECURITY = 4
#: The sections the assembler adds, in file and memory order.
NEW_SECTIONS = (".osrel", ".cmdline", ".linux", ".initrd")


class UkiError(HatcheryError):
    """The stub cannot become a UKI: not a PE32+ x86-64 or arm64 image, no room, signed,
    too big."""


@dataclass(frozen=True, slots=True)
class Section:
    """One section header: where the section is in memory (relative) and in the file."""

    name: str
    virtual_address: int
    virtual_size: int
    raw_offset: int
    raw_size: int
    characteristics: int


@dataclass(frozen=True, slots=True)
class UkiLayout:
    """The image as ``head + kernel + kernel_pad zeros + initrd + initrd_pad zeros``."""

    head: bytes
    kernel_size: int
    kernel_pad: int
    initrd_size: int
    initrd_pad: int

    @property
    def size(self) -> int:
        """The whole image's length in bytes (the response's Content-Length)."""
        return (
            len(self.head) + self.kernel_size + self.kernel_pad + self.initrd_size + self.initrd_pad
        )


@dataclass(frozen=True, slots=True)
class _Headers:
    machine: int
    coff: int  # offset of the COFF file header
    optional: int  # offset of the optional header
    table: int  # offset of the section table
    sections: tuple[Section, ...]
    section_alignment: int
    file_alignment: int
    size_of_image: int
    size_of_headers: int


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _u16(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<H", data, offset)[0]
    return value


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def _parse(pe: bytes) -> _Headers:
    """The headers of a PE32+ x86-64 or arm64 image, checked for what the assembler relies on."""
    if len(pe) < 0x40 or pe[:2] != b"MZ":
        raise UkiError("not a PE image: no MZ (DOS) header")
    coff = _u32(pe, 0x3C) + 4
    if pe[coff - 4 : coff] != b"PE\0\0" or len(pe) < coff + COFF_HEADER.size:
        raise UkiError("not a PE image: e_lfanew does not point at a PE signature")
    machine, count, _, _, _, optional_size, _ = COFF_HEADER.unpack_from(pe, coff)
    if machine not in MACHINES:
        raise UkiError(f"not an x86-64 or arm64 image (machine {machine:#06x})")
    optional = coff + COFF_HEADER.size
    if optional_size < _OPT_DATA_DIRECTORIES or len(pe) < optional + optional_size:
        raise UkiError(f"optional header of {optional_size} bytes is too short or truncated")
    magic = _u16(pe, optional)
    if magic != PE32PLUS_MAGIC:
        raise UkiError(f"not a PE32+ image (optional header magic {magic:#06x})")
    rva_count = _u32(pe, optional + _OPT_NUMBER_OF_RVA)
    if _OPT_DATA_DIRECTORIES + 8 * rva_count > optional_size:
        raise UkiError(f"{rva_count} data directories do not fit the optional header")
    section_alignment = _u32(pe, optional + _OPT_SECTION_ALIGNMENT)
    file_alignment = _u32(pe, optional + _OPT_FILE_ALIGNMENT)
    for what, value in (("SectionAlignment", section_alignment), ("FileAlignment", file_alignment)):
        if value == 0 or value & (value - 1) or value > 0x1000_0000:
            raise UkiError(f"{what} {value:#x} is not a power of two")
    table = optional + optional_size
    if len(pe) < table + count * SECTION_HEADER.size:
        raise UkiError(f"the table of {count} section headers is truncated")
    sections = []
    for i in range(count):
        name, vsize, vaddr, raw_size, raw_offset, *_, flags = SECTION_HEADER.unpack_from(
            pe, table + i * SECTION_HEADER.size
        )
        text = name.rstrip(b"\0").decode("ascii", "replace")
        sections.append(Section(text, vaddr, vsize, raw_offset, raw_size, flags))
    return _Headers(
        machine=machine,
        coff=coff,
        optional=optional,
        table=table,
        sections=tuple(sections),
        section_alignment=section_alignment,
        file_alignment=file_alignment,
        size_of_image=_u32(pe, optional + _OPT_SIZE_OF_IMAGE),
        size_of_headers=_u32(pe, optional + _OPT_SIZE_OF_HEADERS),
    )


def machine(pe: bytes) -> str:
    """The architecture (a value of ``MACHINES``: ``x86-64``, ``arm64``) of a PE32+ image:
    enough of a kernel's first page to check it is an EFI executable for the stub's machine
    (arm64's ``Image`` is; a gzip-compressed ``vmlinuz`` is not, and firmware could not run it).

    :raise UkiError: the bytes do not start a PE32+ x86-64 or arm64 image.
    """
    if len(pe) < 0x40 or pe[:2] != b"MZ":
        raise UkiError("not a PE image: no MZ (DOS) header")
    coff = _u32(pe, 0x3C) + 4
    if pe[coff - 4 : coff] != b"PE\0\0" or len(pe) < coff + COFF_HEADER.size + 2:
        raise UkiError("not a PE image: e_lfanew does not point at a PE signature")
    code = _u16(pe, coff)
    if code not in MACHINES:
        raise UkiError(f"not an x86-64 or arm64 image (machine {code:#06x})")
    if _u16(pe, coff + COFF_HEADER.size) != PE32PLUS_MAGIC:
        raise UkiError("not a PE32+ image")
    return MACHINES[code]


def sections(pe: bytes) -> dict[str, Section]:
    """The sections of a PE32+ x86-64 or arm64 image by name (the last one wins on a
    duplicate name).

    :raise UkiError: the bytes are not such an image (any bytes at all: it is fuzzed).
    """
    return {s.name: s for s in _parse(pe).sections}


#: systemd's ``.sdmagic`` text, which every systemd stub carries.
SYSTEMD_MAGIC = b"#### LoaderInfo: systemd-stub "


def _trailer_is_droppable(stub: bytes, headers: _Headers, end: int) -> bool:
    """Whether the bytes after the sections' raw data are only what no loader maps and we
    may drop: zero padding; the COFF symbol and string tables; or, in an arm64 stub that
    gnu-efi's route made (systemd before 253: ``objcopy -O binary`` of an ELF whose
    hand-written PE header declares only ``.text`` and ``.data``), the ELF sections that
    header leaves undeclared — ``.sbat``, ``.sdmagic``, the dynamic symbols — recognised by
    systemd's ``.sdmagic`` text among them. A PE loader copies only the headers and the
    declared sections (PE Format 3 and 4), so nothing at boot can read any of these."""
    trailer = stub[end:]
    if not trailer.strip(b"\0"):
        return True
    if headers.machine == MACHINE_ARM64 and len(headers.sections) == 2 and SYSTEMD_MAGIC in trailer:
        return True
    _, _, _, symbols_at, symbol_count, _, _ = COFF_HEADER.unpack_from(stub, headers.coff)
    if symbols_at < end or symbols_at > len(stub):
        return False
    strings_at = symbols_at + SYMBOL_SIZE * symbol_count
    if strings_at + 4 > len(stub):
        return False
    strings_end = strings_at + _u32(stub, strings_at)
    return (
        strings_end <= len(stub)
        and not stub[end:symbols_at].strip(b"\0")
        and not stub[strings_end:].strip(b"\0")
    )


#: AArch64's NOP (``hint #0``, little-endian): gnu-efi's arm64 header pads with it.
ARM64_NOP = b"\x1f\x20\x03\xd5"
_OPT_ENTRY_POINT = 16


def _header_room_free(stub: bytes, headers: _Headers, start: int, end: int) -> bool:
    """Whether the header area ``[start, end)`` holds only padding we may write over:
    zeros, or (arm64) whole NOP instructions when the entry point lies elsewhere."""
    room = stub[start:end]
    if not room.strip(b"\0"):
        return True
    if headers.machine != MACHINE_ARM64 or start % 4:
        return False
    entry = _u32(stub, headers.optional + _OPT_ENTRY_POINT)
    nops = room.replace(ARM64_NOP, b"")  # whole words only: start and length are 4-aligned
    return len(room) % 4 == 0 and not nops and not start <= entry < end


def layout(
    stub: bytes, *, cmdline: str, osrel: str, kernel_size: int, initrd_size: int,
    arch: str | None = None,
) -> UkiLayout:  # fmt: skip
    """Where the four sections go, and the image's head with ``.osrel`` and ``.cmdline``.
    ``arch`` (``x86-64``, ``arm64``): the machine the stub must be for (None: either).

    :raise UkiError: the stub is not a PE32+ x86-64 or arm64 image (or not for ``arch``),
        has no room for four more section
        headers, is signed, has trailing data we cannot account for, or the image would not
        fit PE's 32-bit sizes; the command line is not ASCII, is longer than x86 Linux takes or
        holds a NUL (the kernel would cut it there); os-release is not valid text.
    """
    if "\0" in cmdline or "\0" in osrel:
        raise UkiError("the command line and os-release must not contain NUL")
    # systemd's stub hands the kernel at most the bzImage header's cmdline_size bytes and
    # turns every byte above 0x7e into a space: a longer or non-ASCII command line (a seed
    # token at its end) would arrive cut or changed, silently.
    if not cmdline.isascii() or len(cmdline) > MAX_CMDLINE:
        raise UkiError(
            f"the command line must be ASCII and at most {MAX_CMDLINE} bytes "
            f"(x86 Linux's limit), not {len(cmdline.encode(errors='replace'))} bytes"
        )
    if kernel_size <= 0 or initrd_size < 0:
        raise UkiError(f"bad sizes: kernel {kernel_size}, initrd {initrd_size}")
    headers = _parse(stub)
    if arch is not None and MACHINES[headers.machine] != arch:
        raise UkiError(f"the stub is for {MACHINES[headers.machine]}, not {arch}")
    opt = headers.optional
    if _u32(stub, opt + _OPT_NUMBER_OF_RVA) > _DIR_SECURITY:
        security = opt + _OPT_DATA_DIRECTORIES + 8 * _DIR_SECURITY
        if any(struct.unpack_from("<II", stub, security)):
            raise UkiError(
                "the stub is signed: adding sections would break its signature",
                hint="use the unsigned stub and sign the assembled image if Secure Boot needs it",
            )
    with_data = [s for s in headers.sections if s.raw_size]
    end = max((s.raw_offset + s.raw_size for s in with_data), default=headers.size_of_headers)
    if end > len(stub):
        raise UkiError(f"the stub is truncated: its sections end at {end}, the file at {len(stub)}")
    if not _trailer_is_droppable(stub, headers, end):
        raise UkiError(
            f"{len(stub) - end} bytes after the stub's last section are not a symbol table"
        )

    # Four more headers between the table's end and the first raw data / SizeOfHeaders.
    table_end = headers.table + len(headers.sections) * SECTION_HEADER.size
    room_end = min([headers.size_of_headers, *(s.raw_offset for s in with_data)])
    new_end = table_end + len(NEW_SECTIONS) * SECTION_HEADER.size
    if new_end > room_end:
        raise UkiError(
            f"no room for {len(NEW_SECTIONS)} more section headers: the table ends at "
            f"{table_end}, the first section data starts at {room_end}"
        )
    if not _header_room_free(stub, headers, table_end, new_end):
        raise UkiError("the header area after the section table is not empty")

    file_align, va_align = headers.file_alignment, max(headers.section_alignment, PAGE)
    try:  # in the head; .linux and .initrd are streamed
        inline = (osrel.encode(), cmdline.encode())
    except UnicodeEncodeError as exc:
        raise UkiError(f"the command line or os-release is not valid text: {exc.reason}") from exc
    sizes = (len(inline[0]), len(inline[1]), kernel_size, initrd_size)
    mapped = max(
        [headers.size_of_image, *(s.virtual_address + s.virtual_size for s in headers.sections)]
    )
    vaddr, raw = _align(mapped, va_align), _align(end, file_align)
    new: list[Section] = []
    for name, size in zip(NEW_SECTIONS, sizes, strict=True):
        new.append(Section(name, vaddr, size, raw, _align(size, file_align), DATA_READ))
        # Strictly increasing addresses even for an empty section.
        vaddr = _align(vaddr + max(size, 1), va_align)
        raw += _align(size, file_align)
    size_of_image = vaddr
    if size_of_image > _U32 or raw > _U32:
        raise UkiError(
            f"the image would be {raw} bytes, {size_of_image} in memory: over PE's 4 GiB"
        )

    head = bytearray(stub[:end])
    struct.pack_into("<H", head, headers.coff + 2, len(headers.sections) + len(NEW_SECTIONS))
    struct.pack_into("<II", head, headers.coff + 8, 0, 0)  # the dropped symbol table
    struct.pack_into("<I", head, opt + _OPT_SIZE_OF_IMAGE, size_of_image)
    init_data = _u32(stub, opt + _OPT_SIZE_OF_INIT_DATA) + sum(s.raw_size for s in new)
    struct.pack_into("<I", head, opt + _OPT_SIZE_OF_INIT_DATA, min(init_data, _U32))
    # CheckSum covers the whole file, kernel and initrd included, which this module never
    # reads; edk2 does not verify it (nor does Authenticode, which skips the field), so it
    # is zeroed, as the spec allows for images that are not drivers loaded at boot by Windows.
    struct.pack_into("<I", head, opt + _OPT_CHECKSUM, 0)
    for i, section in enumerate(new):
        SECTION_HEADER.pack_into(
            head,
            table_end + i * SECTION_HEADER.size,
            section.name.encode(),
            section.virtual_size,
            section.virtual_address,
            section.raw_size,
            section.raw_offset,
            0,
            0,
            0,
            0,
            section.characteristics,
        )
    head += bytes(new[0].raw_offset - end)
    for section, payload in zip(new[:2], inline, strict=True):
        head += payload + bytes(section.raw_size - len(payload))
    assert len(head) == new[2].raw_offset
    return UkiLayout(
        head=bytes(head),
        kernel_size=kernel_size,
        kernel_pad=new[2].raw_size - kernel_size,
        initrd_size=initrd_size,
        initrd_pad=new[3].raw_size - initrd_size,
    )
