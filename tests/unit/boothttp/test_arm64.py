"""arm64 births, the pieces: the arm64 stub in the UKI assembler (Debian's real one, from
``make arm64-guest``, and synthetic ones), the profiles' ``arm64:`` artefacts, the DHCPv4
and DHCPv6 answers to architectures 11 and 19, and the boot HTTP route choosing per ``?arch=``
on loopback."""

from __future__ import annotations

import gzip
import ipaddress
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery.boothttp import uki
from hatchery.boothttp.app import BootHttpConfig, BootHttpServer
from hatchery.boothttp.profiles import ARM64, X86_64, Artefacts, Profiles
from hatchery.config import DEFAULT_UKI_STUB, parse_config
from hatchery.dhcp.packet import ZERO_IP, DhcpPacket, MessageType, Op, Opt, opt_str, opt_u8
from hatchery.dhcp.responder import BootConfig, boot_answer
from hatchery.dhcp6.packet import Dhcp6Packet, Option, duid_ll, opt_length_prefixed, opt_u16s
from hatchery.dhcp6.packet import MessageType as Message6
from hatchery.dhcp6.packet import Opt as Opt6
from hatchery.dhcp6.responder import Boot6Config, boot_options
from hatchery.errors import ConfigError
from hatchery.images.store import ImageStore
from hatchery.netboot import Netboot
from hatchery_lab.guest import find_arm64_guest
from tests.conftest import FUZZ_EXAMPLES, missing
from tests.support.pe_stubs import content, synthetic_stub

MAC = "52:54:00:aa:64:01"
SERVER = ipaddress.IPv4Address("10.9.0.1")
OSREL = 'ID=hatchery\nNAME="Hatchery"\n'
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TEMPLATE = "#!ipxe\nkernel {{kernel_url}} {{cmdline}}\ninitrd {{initrd_url}}\nboot\n"


def arm64_stub() -> bytes:
    guest = find_arm64_guest()
    if guest is None:
        missing("no arm64 guest in .cache (make arm64-guest)")
    assert guest is not None
    return guest.stub.read_bytes()


# --- the assembler ------------------------------------------------------------------------------


def test_debians_arm64_stub_becomes_a_uki() -> None:
    stub = arm64_stub()
    assert uki.machine(stub) == ARM64
    kernel, initrd = b"K" * 70_001, b"I" * 3_333
    plan = uki.layout(stub, cmdline="console=ttyAMA0", osrel=OSREL, arch=ARM64,
                      kernel_size=len(kernel), initrd_size=len(initrd))  # fmt: skip
    image = plan.head + kernel + bytes(plan.kernel_pad) + initrd + bytes(plan.initrd_pad)
    found = uki.sections(image)
    # gnu-efi's hand-written header: .text and .data only; .sbat, .sdmagic after them dropped
    assert list(found) == [".text", ".data", ".osrel", ".cmdline", ".linux", ".initrd"]
    assert content(image, found[".linux"]) == kernel
    assert content(image, found[".initrd"]) == initrd
    assert content(image, found[".cmdline"]) == b"console=ttyAMA0"
    assert uki.machine(image) == ARM64
    # the stub's code is untouched: its sections' bytes are the stub's own
    for name in (".text", ".data"):
        assert content(image, found[name]) == content(stub, uki.sections(stub)[name])
    with pytest.raises(uki.UkiError, match="for arm64, not x86-64"):
        uki.layout(stub, cmdline="", osrel="", kernel_size=1, initrd_size=0, arch=X86_64)


def test_debians_arm64_kernel_is_an_efi_executable() -> None:
    guest = find_arm64_guest()
    if guest is None:
        missing("no arm64 guest in .cache (make arm64-guest)")
    assert guest is not None
    with guest.image.open("rb") as f:
        assert uki.machine(f.read(4096)) == ARM64


def test_synthetic_arm64_stub_and_the_refusals() -> None:
    stub = synthetic_stub(machine=uki.MACHINE_ARM64)
    plan = uki.layout(stub, cmdline="x", osrel="", kernel_size=1, initrd_size=0, arch=ARM64)
    assert uki.machine(plan.head) == ARM64
    for machine in (0x14C, 0x1C4, 0x5064):  # i386, ARMv7 Thumb-2, RISC-V 64
        with pytest.raises(uki.UkiError, match="not an x86-64 or arm64 image"):
            uki.layout(synthetic_stub(machine=machine), cmdline="", osrel="", kernel_size=1,
                       initrd_size=0)  # fmt: skip
    # NOP padding may be written over in an arm64 header only; other bytes never
    nops = bytearray(stub)
    table_end = 0x40 + 24 + 240 + 2 * 40
    nops[table_end : table_end + 160] = uki.ARM64_NOP * 40
    uki.layout(bytes(nops), cmdline="", osrel="", kernel_size=1, initrd_size=0)
    x86 = bytearray(synthetic_stub())
    x86[table_end : table_end + 160] = uki.ARM64_NOP * 40
    with pytest.raises(uki.UkiError, match="not empty"):
        uki.layout(bytes(x86), cmdline="", osrel="", kernel_size=1, initrd_size=0)
    # trailing data: the systemd magic excuses it in a two-section arm64 stub only
    trailer = b".sbat data " + uki.SYSTEMD_MAGIC + b"252 ####\0"
    uki.layout(synthetic_stub(machine=uki.MACHINE_ARM64, trailer=trailer), cmdline="",
               osrel="", kernel_size=1, initrd_size=0)  # fmt: skip
    with pytest.raises(uki.UkiError, match="not a symbol table"):
        uki.layout(synthetic_stub(trailer=trailer), cmdline="", osrel="", kernel_size=1,
                   initrd_size=0)  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (gzip.compress(b"MZ" + bytes(4000)), "no MZ"),  # a compressed vmlinuz
        (b"MZ" + bytes(100), "PE signature"),
        (synthetic_stub(machine=0x14C), "machine 0x014c"),
        (synthetic_stub(magic=0x10B), "not a PE32+"),
    ],
)
def test_machine_refuses_what_firmware_could_not_run(data: bytes, message: str) -> None:
    with pytest.raises(uki.UkiError, match=message):
        uki.machine(data)


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 0x200), st.binary(max_size=8))
def test_machine_of_any_bytes_is_an_answer_or_a_refusal(data: bytes, at: int, patch: bytes) -> None:
    """The route reads a kernel's first page with it: any bytes, a mutated real header too."""
    mutated = bytearray(synthetic_stub(machine=uki.MACHINE_ARM64))
    mutated[at : at + len(patch)] = patch
    for candidate in (data, b"MZ" + data, bytes(mutated)):
        try:
            assert uki.machine(candidate) in uki.MACHINES.values()
        except uki.UkiError:
            pass


# --- profiles -----------------------------------------------------------------------------------


def profiles(tmp_path: Path, text: str) -> Profiles:
    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "templates" / "default.ipxe").write_text(TEMPLATE)
    (tmp_path / "profiles.yaml").write_text(text)
    return Profiles.load(tmp_path / "profiles.yaml")


BOTH = """default: hv
profiles:
  hv:
    image: hv-1
    cmdline: console=ttyS0 quiet
    arm64:
      image: hv-1-arm64
  small:
    image: small
    role: tiny
    arm64: {image: small-arm64, kernel: Image-6.1, initrd: initrd.zst, cmdline: console=ttyAMA0}
"""


def test_profiles_name_arm64_artefacts(tmp_path: Path) -> None:
    loaded = profiles(tmp_path, BOTH)
    hv, small = loaded.profiles["hv"], loaded.profiles["small"]
    assert hv.artefacts() == Artefacts("hv-1", "vmlinuz", "initrd", "console=ttyS0 quiet")
    # defaults: the bare Image, the initrd, the profile's own command line
    assert hv.artefacts(ARM64) == Artefacts("hv-1-arm64", "Image", "initrd", "console=ttyS0 quiet")
    assert small.artefacts(ARM64) == Artefacts("small-arm64", "Image-6.1", "initrd.zst",
                                               "console=ttyAMA0")  # fmt: skip
    assert small.artefacts("riscv64") is None
    line = small.uki_cmdline(MAC, "http://x", "http://x/seed/T", ARM64)
    assert line == ("console=ttyAMA0 hatchery.seed=http://x/seed/T hatchery.role=tiny "
                    "hatchery.image=small-arm64 BOOTIF=01-52-54-00-aa-64-01")  # fmt: skip
    assert "hatchery.image=small " in small.uki_cmdline(MAC, "http://x")  # x86-64 unchanged
    # the iPXE script stays x86-64's
    assert "/artefacts/hv-1/vmlinuz" in hv.render(MAC, "http://x")


def test_a_profile_without_arm64_boots_no_arm64_machine(tmp_path: Path) -> None:
    loaded = profiles(tmp_path, "profiles:\n  a:\n    image: a\n")
    assert loaded.profiles["a"].arm64 is None
    assert loaded.profiles["a"].artefacts(ARM64) is None


@pytest.mark.parametrize(
    ("arm64", "message"),
    [
        ("{kernel: Image}", r"profiles\.a\.arm64\.image: required"),
        ("{image: ../etc}", r"arm64\.image: '\.\./etc' must be a relative path"),
        ("{image: x, kernel: /boot/Image}", r"arm64\.kernel: .* must be a relative path"),
        ("{image: x, dtb: x.dtb}", r"profiles\.a\.arm64\.dtb: unknown key"),
        ("{image: x, cmdline: 'a hatchery.seed=x'}", r"arm64\.cmdline: remove hatchery\.seed"),
        ("[x]", r"profiles\.a\.arm64: expected a mapping"),
    ],
)
def test_bad_arm64_artefacts_fail_at_load(tmp_path: Path, arm64: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        profiles(tmp_path, f"profiles:\n  a:\n    image: a\n    arm64: {arm64}\n")


# --- DHCPv4 and DHCPv6 --------------------------------------------------------------------------


def discover(vendor: str, arch: int) -> DhcpPacket:
    return DhcpPacket(Op.BOOTREQUEST, 0x1234, bytes.fromhex(MAC.replace(":", "")), options=(
        opt_u8(Opt.MESSAGE_TYPE, MessageType.DISCOVER), opt_str(Opt.VENDOR_CLASS, vendor),
        opt_str(Opt.CLIENT_ARCH, arch.to_bytes(2, "big"))))  # fmt: skip


PLAIN = BootConfig("http://10.9.0.1:8080")
HTTPS = BootConfig("http://10.9.0.1:8080", https_base="https://10.9.0.1:8443")


@pytest.mark.parametrize(
    ("boot", "url"),
    [
        (PLAIN, f"http://10.9.0.1:8080/boot/uki.efi?mac={MAC}&arch=arm64"),
        (HTTPS, f"https://10.9.0.1:8443/boot/uki.efi?mac={MAC}&arch=arm64"),
    ],
)
def test_arm64_http_boot_gets_the_arm64_uki(boot: BootConfig, url: str) -> None:
    siaddr, file, options = boot_answer(discover("HTTPClient:Arch:00019:UNDI:003000", 19),
                                        boot, SERVER)  # fmt: skip
    by_code = {o.code: o.data for o in options}
    assert siaddr == SERVER and file == url.encode()
    assert by_code[Opt.BOOTFILE] == url.encode() and by_code[Opt.VENDOR_CLASS] == b"HTTPClient"
    # x86-64 is unchanged: iPXE over plain HTTP, the x86-64 UKI over HTTPS
    _, x86, _ = boot_answer(discover("HTTPClient:Arch:00016:UNDI:003000", 16), boot, SERVER)
    assert x86 == (b"http://10.9.0.1:8080/ipxe/ipxe.efi" if boot is PLAIN
                   else f"https://10.9.0.1:8443/boot/uki.efi?mac={MAC}".encode())  # fmt: skip


def test_arm64_pxe_gets_no_boot_file_and_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "hatchery.dhcp.responder"):
        answer = boot_answer(discover("PXEClient:Arch:00011:UNDI:003000", 11), PLAIN, SERVER)
    assert answer == (ZERO_IP, b"", [])
    assert "arm64 PXE (arch 11): no arm64 iPXE to send" in caplog.text
    for arch in (15, 17, 99):  # IA32 HTTP, anything else: still nothing
        assert boot_answer(discover("HTTPClient", arch), PLAIN, SERVER) == (ZERO_IP, b"", [])


def solicit6(arch: int) -> Dhcp6Packet:
    return Dhcp6Packet(Message6.SOLICIT, 0x123456, (
        Option(Opt6.CLIENTID, duid_ll(MAC)), opt_u16s(Opt6.ORO, Opt6.BOOTFILE_URL),
        opt_u16s(Opt6.CLIENT_ARCH, arch),
        opt_length_prefixed(Opt6.VENDOR_CLASS, [f"HTTPClient:Arch:{arch:05d}".encode()],
                            (343).to_bytes(4, "big"))))  # fmt: skip


def test_dhcp6_sends_arm64_http_boot_to_the_arm64_uki() -> None:
    boot = Boot6Config("http://[fd00::1]:8080")
    urls = {o.data for o in boot_options(solicit6(19), boot, MAC) if o.code == Opt6.BOOTFILE_URL}
    assert urls == {f"http://[fd00::1]:8080/boot/uki.efi?mac={MAC}&arch=arm64".encode()}
    tls = Boot6Config("http://[fd00::1]:8080", https_base="https://[fd00::1]:8443")
    urls = {o.data for o in boot_options(solicit6(19), tls, MAC) if o.code == Opt6.BOOTFILE_URL}
    assert urls == {f"https://[fd00::1]:8443/boot/uki.efi?mac={MAC}&arch=arm64".encode()}
    assert boot_options(solicit6(19), boot, None) == []  # no MAC: no per-machine image
    assert boot_options(solicit6(15), boot, MAC) == []
    x86 = {o.data for o in boot_options(solicit6(16), boot, MAC) if o.code == Opt6.BOOTFILE_URL}
    assert x86 == {b"http://[fd00::1]:8080/ipxe/ipxe.efi"}


# --- the route ----------------------------------------------------------------------------------


ARM64_KERNEL = synthetic_stub(machine=uki.MACHINE_ARM64) + b"arm64 kernel"
X86_KERNEL = b"x86 bzImage, not checked" * 100


ROUTE_PROFILES = (
    BOTH
    + "  plain:\n    image: hv-1\n"
    + "machines:\n  52:54:00:aa:64:02: small\n  52:54:00:aa:64:03: plain\n"
)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[BootHttpServer]:
    root = tmp_path / "artefacts"
    for folder, name, kernel in (
        ("hv-1", "vmlinuz", X86_KERNEL),
        ("hv-1-arm64", "Image", ARM64_KERNEL),
        ("small-arm64", "Image-6.1", gzip.compress(ARM64_KERNEL)),  # a packaged vmlinuz
    ):
        (root / folder).mkdir(parents=True)
        (root / folder / name).write_bytes(kernel)
        (root / folder / ("initrd.zst" if folder == "small-arm64" else "initrd")).write_bytes(
            folder.encode() * 1000
        )
    (tmp_path / "x86.stub").write_bytes(synthetic_stub())
    (tmp_path / "arm64.stub").write_bytes(synthetic_stub(machine=uki.MACHINE_ARM64))
    config = BootHttpConfig(root, profiles(tmp_path, ROUTE_PROFILES),
                            uki_stub=tmp_path / "x86.stub",
                            uki_stub_arm64=tmp_path / "arm64.stub")  # fmt: skip
    running = BootHttpServer(config, "127.0.0.1", 0)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def get(server: BootHttpServer, query: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{server.port}/boot/uki.efi?{query}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.read()


async def test_the_route_picks_stub_and_artefacts_per_arch(server: BootHttpServer) -> None:
    status, image = await get(server, f"mac={MAC}&arch=arm64")
    assert status == 200 and uki.machine(image) == ARM64
    found = uki.sections(image)
    assert content(image, found[".linux"]) == ARM64_KERNEL
    assert content(image, found[".initrd"]) == b"hv-1-arm64" * 1000
    assert b"hatchery.image=hv-1-arm64 " in content(image, found[".cmdline"])
    assert b"IMAGE_ID=hv-1-arm64" in content(image, found[".osrel"])
    for query in (f"mac={MAC}", f"mac={MAC}&arch=x86-64"):  # no ?arch=: x86-64, as before
        status, image = await get(server, query)
        assert status == 200 and uki.machine(image) == X86_64
        assert content(image, uki.sections(image)[".linux"]) == X86_KERNEL


async def test_the_route_refuses_what_it_cannot_boot(
    server: BootHttpServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "hatchery.boothttp.app"):
        status, body = await get(server, f"mac={MAC}&arch=sparc")
        assert status == 400 and b"unknown ?arch=" in body
        # a compressed vmlinuz named as the arm64 kernel: a 404 and a log line saying why
        status, body = await get(server, "mac=52:54:00:aa:64:02&arch=arm64")
        assert status == 404 and b"no boot image" in body
        assert "small-arm64/Image-6.1 cannot be the arm64 image's kernel: not a PE" in caplog.text
        # a profile without arm64 artefacts: a clear 404 and a log line
        status, body = await get(server, "mac=52:54:00:aa:64:03&arch=arm64")
        assert status == 404 and b"no arm64 boot for 52:54:00:aa:64:03" in body
        assert "profile plain has no arm64 artefacts" in caplog.text
        # the arm64 stub is really the x86-64 one: refused, not sent
        (tmp_path / "arm64.stub").write_bytes(synthetic_stub())
        status, _ = await get(server, f"mac={MAC}&arch=arm64")
        assert status == 500 and "the stub is for x86-64, not arm64" in caplog.text


def test_a_node_births_arm64_with_the_stub_its_config_names(tmp_path: Path) -> None:
    """The hypervisor image carries the x86-64 stub only; ``boot.uki_stub_arm64`` names an
    arm64 one the operator put on /data, and the agent's boot HTTP service uses it."""
    stub = tmp_path / "linuxaa64.efi.stub"
    bridge = {"name": "br0", "boot": {"uki_stub_arm64": str(stub)}}
    boot = parse_config({"bridges": [bridge]}).bridges[0].boot
    assert boot is not None and boot.uki_stub_arm64 == stub
    assert boot.uki_stub == DEFAULT_UKI_STUB  # unchanged unless named
    netboot = Netboot("br0", boot, tmp_path / "state", ImageStore(tmp_path / "store"), lambda: "v1")
    netboot.prepare()
    config = netboot.http_config()
    assert config.stub(ARM64) == stub and config.stub(X86_64) == DEFAULT_UKI_STUB
    with pytest.raises(ConfigError, match="uki_stub_arm64: expected"):
        parse_config({"bridges": [{"name": "br0", "boot": {"uki_stub_arm64": ["x"]}}]})
