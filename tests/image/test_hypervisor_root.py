"""The hypervisor image's root file system, checked with testinfra (chroot backend).

Nothing here boots: the cpio is unpacked and inspected as the kernel will see it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import testinfra

from hatchery.upgrade.rootindex import INDEX_PATH, index_tree, parse_index
from hatchery_lab.images import manifest

EXPECTED_PACKAGES = (
    "linux-image-amd64", "systemd", "systemd-sysv", "udev", "qemu-system-x86", "qemu-utils",
    "nftables", "kexec-tools", "iproute2", "openssh-server", "python3", "e2fsprogs",
)  # fmt: skip
AGENT_UNIT = "hatchery-agent.service"


@pytest.fixture(scope="module")
def host(hypervisor_root: Path) -> testinfra.host.Host:
    return testinfra.get_host(str(hypervisor_root), connection="chroot")


def persistent_links(root: Path) -> dict[str, str]:
    """Path -> target of every symlink rule (L/L+) in the one list of persistent paths."""
    conf = root / "usr/lib/tmpfiles.d/hatchery-persistent.conf"
    links = {}
    for line in conf.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in ("L", "L+"):
            links[fields[1]] = fields[6]
    return links


@pytest.mark.parametrize("package", EXPECTED_PACKAGES)
def test_expected_packages_are_installed(host: testinfra.host.Host, package: str) -> None:
    assert host.package(package).is_installed


def test_tools_the_node_needs_are_there(host: testinfra.host.Host) -> None:
    for tool in ("qemu-system-x86_64", "qemu-img", "nft", "kexec", "ip", "sshd", "systemd-repart"):
        assert host.exists(tool), tool
    assert host.file("/init").linked_to == "/usr/lib/systemd/systemd"


def test_agent_is_installed_from_this_repository(host: testinfra.host.Host) -> None:
    agent = host.file("/usr/bin/hatchery-agent")
    assert agent.is_symlink and agent.linked_to == "/opt/hatchery/venv/bin/hatchery-agent"
    result = host.run("/usr/bin/hatchery-agent --help")
    assert result.rc == 0, result.stderr
    assert "hatchery-agent" in result.stdout
    imported = host.run(
        "/opt/hatchery/venv/bin/python -c 'import aiohttp, qemu.qmp, pyroute2, cryptography,"
        " zstandard, yaml, hatchery.agent_main; print(hatchery.__file__)'"
    )
    assert imported.rc == 0, imported.stderr
    assert imported.stdout.startswith("/opt/hatchery/venv/lib/python3.11/site-packages/")
    # the venv uses Debian's python3, and the image carries no pip
    assert host.file("/opt/hatchery/venv/bin/python").linked_to.startswith("/usr/bin/python3")
    assert not host.exists("pip") and not host.file("/opt/hatchery/venv/bin/pip").exists


def test_agent_unit_is_enabled_by_preset(host: testinfra.host.Host) -> None:
    unit = host.file(f"/usr/lib/systemd/system/{AGENT_UNIT}")
    wanted = (
        "Type=notify",
        "WatchdogSec=",
        "LimitNOFILE=",
        "Restart=on-failure",
        "KillMode=process",
        "ExecStart=/usr/bin/hatchery-agent run --after /run/hatchery/node-ready --seed --config "
        "/etc/hatchery/agent.yaml",
        "TimeoutStartSec=",
    )
    for setting in wanted:
        assert setting in unit.content_string, setting
    assert (
        f"enable {AGENT_UNIT}"
        in host.file("/usr/lib/systemd/system-preset/40-hatchery.preset").content_string
    )
    assert host.run(f"systemctl is-enabled {AGENT_UNIT}").stdout.strip() == "enabled"
    assert host.run("systemctl is-enabled hatchery-data.service").stdout.strip() == "enabled"
    assert host.run("systemctl is-enabled systemd-firstboot.service").stdout.strip() == "masked"


#: Every unit enabled in the image, and why: anything else enabled is boot time and attack
#: surface a node does not need (images/hypervisor/.../40-hatchery.preset disables the rest).
ENABLED_UNITS = {
    "hatchery-data.service", "hatchery-ssh-keygen.service",  # /data, then its host keys
    "hatchery-agent.service", "hatchery-boot-guard.service",
    "hatchery-selfcheck.service",  # runs only with hatchery.selfcheck=1
    "systemd-networkd.service", "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",  # enabled with networkd; only runs if asked for
    "ssh.service", "getty@.service",  # operator access: SSH and the local console
    "nftables.service",  # the operator's own host rules, before the agent adds its tables
    "systemd-pstore.service",  # kernel crash records kept for the operator
    "fstrim.timer",  # TRIM for /data's SSDs
    "reboot.target", "remote-fs.target", "remote-cryptsetup.target", "remote-veritysetup.target",
}  # fmt: skip


def test_only_the_units_a_node_needs_are_enabled(host: testinfra.host.Host) -> None:
    listed = host.run("systemctl list-unit-files --no-legend --no-pager --state=enabled")
    assert listed.rc == 0, listed.stderr
    enabled = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert enabled == ENABLED_UNITS
    masked = ("systemd-hwdb-update.service", "systemd-network-generator.service",
              "kexec-load.service", "systemd-firstboot.service", "systemd-update-utmp.service",
              "systemd-update-utmp-runlevel.service", "modprobe@drm.service")  # fmt: skip
    for unit in masked:
        assert host.run(f"systemctl is-enabled {unit}").stdout.strip() == "masked", unit


#: The generators PID 1 runs on every boot, before anything starts, that a node never needs
#: (mkosi.postinst masks them), and those it keeps.
MASKED_GENERATORS = ("cryptsetup", "integritysetup", "veritysetup", "gpt-auto",
                     "hibernate-resume", "rc-local", "system-update", "sysv", "run")  # fmt: skip
KEPT_GENERATORS = ("fstab", "getty", "debug")


def test_generators_a_node_never_needs_are_masked(hypervisor_root: Path) -> None:
    masks = hypervisor_root / "etc/systemd/system-generators"
    shipped = hypervisor_root / "usr/lib/systemd/system-generators"
    for name in (f"systemd-{g}-generator" for g in MASKED_GENERATORS):
        assert (shipped / name).exists(), f"{name}: no longer shipped, drop its mask"
        assert (masks / name).readlink() == Path("/dev/null"), name
    for name in (f"systemd-{g}-generator" for g in KEPT_GENERATORS):
        assert (shipped / name).exists() and not (masks / name).is_symlink(), name
    # With the SysV generator masked, a script in /etc/init.d runs only if it has a unit of
    # its own: every one has (or is masked as systemd masks hwclock.sh)
    units = [hypervisor_root / "usr/lib/systemd/system", hypervisor_root / "etc/systemd/system"]
    for script in (hypervisor_root / "etc/init.d").iterdir():
        unit = script.name.removesuffix(".sh") + ".service"
        assert any((d / unit).is_symlink() or (d / unit).exists() for d in units), script.name


#: The units the agent's gate (hatchery-node-ready.service) waits for at boot, each of which
#: must run ahead of the agent loading its code meanwhile (docs/images.md, "The live root:
#: kept compressed in RAM", where the tmpfiles' nice level is measured).
UNITS_AHEAD_OF_THE_LOADING_AGENT = (
    "hatchery-data.service", "systemd-networkd.service", "systemd-tmpfiles-setup.service",
)  # fmt: skip


def _nice(root: Path, unit: str) -> int:
    """The unit's Nice= as PID 1 reads it: systemd's own view of the unit file and its drop-ins
    (``/etc`` overriding ``/usr/lib``), in the order they apply; the last setting wins."""
    shown = subprocess.run(
        ["systemd-analyze", f"--root={root}", "cat-config", f"systemd/system/{unit}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"/systemd/system/{unit}\n" in shown.stdout, f"{unit} is not in the image"
    settings = [line for line in shown.stdout.splitlines() if line.startswith("Nice=")]
    return int(settings[-1].removeprefix("Nice=")) if settings else 0


def test_the_gates_units_run_ahead_of_the_loading_agent(hypervisor_root: Path) -> None:
    agent = _nice(hypervisor_root, "hatchery-agent.service")
    assert agent < 0, "the agent loads at a raised priority"
    for unit in UNITS_AHEAD_OF_THE_LOADING_AGENT:
        assert _nice(hypervisor_root, unit) < agent, unit


def test_etc_and_var_are_as_new_as_usr(hypervisor_root: Path) -> None:
    """Else every boot runs what ConditionNeedsUpdate= gates (systemd-sysusers, before udev)."""
    usr = (hypervisor_root / "usr").stat().st_mtime_ns
    for folder in ("etc", "var"):
        stamp = hypervisor_root / folder / ".updated"
        written = int(stamp.read_text().split("TIMESTAMP_NSEC=")[1])
        assert written == usr and stamp.stat().st_mtime_ns // 10**9 == usr // 10**9, folder


def test_what_a_node_does_not_need_is_left_out(hypervisor_root: Path) -> None:
    """The trimmings of images/hypervisor/mkosi.conf and hatchery_lab.liveroot, each a few MB
    of every node's RAM and every download; the agent's zstandard still loads its C backend."""
    root = hypervisor_root
    assert not list(root.glob("boot/vmlinuz-*")) and not list(
        root.glob("usr/lib/modules/*/vmlinuz")
    )
    assert not (root / "usr/lib/udev/hwdb.bin").exists()
    assert not list((root / "usr/lib/udev/hwdb.d").glob("*.hwdb"))
    assert not list(root.glob("usr/lib/x86_64-linux-gnu/gconv/*.so"))
    assert (
        not list(root.glob("usr/share/qemu/openbios-*"))
        and not (root / "usr/share/qemu/slof.bin").exists()
    )
    for kept in (
        "usr/lib/ipxe/qemu/efi-virtio.rom",
        "usr/share/qemu/kvmvapic.bin",
        "usr/share/qemu/linuxboot_dma.bin",
        "usr/share/seabios/bios-256k.bin",
        "usr/share/qemu/qboot.rom",  # the firmware of direct kernel boots (qemu.firmware)
    ):
        assert (root / kept).exists(), kept
    site = root / "opt/hatchery/venv/lib/python3.11/site-packages/zstandard"
    assert not list(site.glob("_cffi*")) and list(site.glob("backend_c.*.so"))
    # The wheels' extensions are stripped (zstandard's was 11.6 MB with its symbol tables).
    for ext in (root / "opt/hatchery/venv").rglob("*.so"):
        sections = subprocess.run(["readelf", "-SW", str(ext)], capture_output=True, text=True,
                                  check=True).stdout  # fmt: skip
        assert ".symtab" not in sections and ".debug_info" not in sections, ext
    assert not (root / "usr/lib/python3.11/pydoc_data").exists()
    assert not (root / "usr/lib/python3.11/test").exists()
    # busybox runs only the initrd's /init, which carries its own copy
    assert not (root / "usr/bin/busybox").exists()
    for gone in ("usr/bin/ssh", "usr/bin/ssh-agent", "usr/lib/openssh/ssh-keysign",
                 "usr/lib/qemu/qemu-bridge-helper", "usr/lib/qemu/virtiofsd",
                 "usr/lib/x86_64-linux-gnu/libdb-5.3.so", "usr/sbin/mkinitramfs",
                 "var/cache/debconf/templates.dat"):  # fmt: skip
        assert not (root / gone).exists(), gone
    for kept in ("usr/sbin/sshd", "usr/bin/ssh-keygen", "usr/lib/openssh/sftp-server",
                 "var/lib/dpkg/status"):  # fmt: skip
        assert (root / kept).exists(), kept
    assert list(root.glob("var/lib/dpkg/info/*.list")), "dpkg -L still answers"
    # the programs that run with another user's rights: no SSH client helper among them
    privileged = {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o6000
    }
    assert not {p for p in privileged if "ssh" in p}, privileged


def _dynamic_elf_files(root: Path) -> list[str]:
    """Paths (inside ``root``) of every dynamically linkable ELF program or library: ELF
    magic and type executable or shared object (kernel modules are relocatable objects)."""
    found = []
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        with path.open("rb") as f:
            head = f.read(18)
        if head[:4] == b"\x7fELF" and int.from_bytes(head[16:18], "little") in (2, 3):
            found.append("/" + str(path.relative_to(root)))
    return found


def test_every_program_and_library_finds_the_libraries_it_links(hypervisor_root: Path) -> None:
    """The trimmings remove libraries by name (images/hypervisor/mkosi.conf: QEMU's UI and
    audio modules and what only they link). The root's own dynamic linker, asked by its own
    ``ldd`` in a chroot, must find every library of everything left, or a program would fail
    to start on a node only when first run (QEMU with a VM to start, kexec at an upgrade)."""
    files = _dynamic_elf_files(hypervisor_root)
    assert len(files) > 500, len(files)  # the whole root was seen (about 800), not a stub tree
    for must in ("/usr/bin/qemu-system-x86_64", "/usr/sbin/kexec", "/usr/sbin/nft"):
        assert must in files, must
    by_folder: dict[str, list[str]] = {}
    for path in files:
        by_folder.setdefault(path.rsplit("/", 1)[0], []).append(path)
    missing: list[str] = []
    for folder, group in by_folder.items():
        # A private library (systemd's libsystemd-core) is found through the RUNPATH of the
        # programs that load it, which names its own folder: ldd of it alone is given that.
        out = subprocess.run(["chroot", str(hypervisor_root), "/usr/bin/env",
                              f"LD_LIBRARY_PATH={folder}", "/usr/bin/ldd", *group],
                             capture_output=True, text=True, check=False).stdout  # fmt: skip
        current = group[0]  # ldd names each file only when it is given several
        for line in out.splitlines():
            if len(group) > 1 and not line.startswith(("\t", " ")) and line.endswith(":"):
                current = line[:-1]
            elif "not found" in line:
                missing.append(f"{current}: {line.strip()}")
    assert not missing, "\n".join(missing)


def test_bytecode_is_trusted_without_reading_its_source(hypervisor_root: Path) -> None:
    """Unchecked hash-based pycs (PEP 552, flags 0b01) for the agent's venv and the standard
    library: the root is read-only, so checking would only read and hash every .py at boot."""
    site = hypervisor_root / "opt/hatchery/venv/lib/python3.11/site-packages"
    stdlib = hypervisor_root / "usr/lib/python3.11"
    for folder in (site / "hatchery", site / "aiohttp", site / "pyroute2", stdlib / "asyncio"):
        flags = {int.from_bytes(p.read_bytes()[4:8], "little") for p in folder.rglob("*.pyc")}
        assert flags == {0b01}, folder


def test_the_root_carries_its_own_index(hypervisor_root: Path) -> None:
    """The index the build wrote (hatchery_lab.liveroot) is the one upgrades would compute by
    hashing the whole root: live patches trust it to skip what the images agree on."""
    carried = (hypervisor_root / INDEX_PATH).read_bytes()
    assert carried == index_tree(hypervisor_root)
    assert "opt/hatchery/venv/bin/hatchery-agent" in parse_index(carried)


def test_persistent_paths_are_symlinks_into_data(
    host: testinfra.host.Host, hypervisor_root: Path
) -> None:
    links = persistent_links(hypervisor_root)
    assert {"/var/lib/hatchery", "/etc/hatchery", "/etc/ssh/host-keys",
            "/etc/systemd/network", "/root/.ssh"} <= set(links)  # fmt: skip
    for path, target in links.items():
        assert target.startswith("/data/"), (path, target)
        f = host.file(path)
        assert f.is_symlink, path
        assert f.linked_to == target, path
    # the agent's default state dir is on /data too
    assert links["/var/lib/hatchery"] == "/data/var/lib/hatchery"


def test_data_disk_is_created_only_on_blank_disks(hypervisor_root: Path) -> None:
    repart = (hypervisor_root / "usr/lib/hatchery/repart.d/50-hatchery-data.conf").read_text()
    assert "Label=hatchery-data" in repart and "Format=ext4" in repart
    setup = (hypervisor_root / "usr/lib/hatchery/data-setup").read_text()
    assert "empty=require" in setup and '--empty="$empty"' in setup
    assert "hatchery.wipe-data=1" in setup


def test_no_secrets_or_identity_baked_in(host: testinfra.host.Host, hypervisor_root: Path) -> None:
    assert not list((hypervisor_root / "etc/ssh").glob("ssh_host_*")), "SSH host keys in image"
    machine_id = (hypervisor_root / "etc/machine-id").read_text().strip()
    # empty: a new one every boot, and not a "first boot" that re-applies presets (postinst)
    assert machine_id == "", machine_id
    assert not (hypervisor_root / "var/lib/dbus/machine-id").exists()
    assert not (hypervisor_root / "var/lib/systemd/random-seed").exists()
    for line in (hypervisor_root / "etc/shadow").read_text().splitlines():
        user, hashed = line.split(":")[:2]
        assert not hashed.startswith("$"), f"{user} has a password hash baked in"
    # private keys anywhere in /etc, /root, /opt, /var, /data: a PEM header followed by a body
    # (the header alone appears as a constant in cryptography's own source)
    pattern = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]{40}")
    found = [
        str(p.relative_to(hypervisor_root))
        for top in ("etc", "root", "opt", "var", "data")
        for p in (hypervisor_root / top).rglob("*")
        if p.is_file() and not p.is_symlink() and pattern.search(p.read_bytes())
    ]
    assert found == []


def test_version_marker_matches_the_build(hypervisor_root: Path, images: Path) -> None:
    os_release = (hypervisor_root / "usr/lib/os-release").read_text()
    version = manifest(images, "hypervisor")["version"]
    assert f'IMAGE_VERSION="{version}"' in os_release or f"IMAGE_VERSION={version}" in os_release


# What a node needs from its kernel (as modules or built in), one line per class of the
# allowlist in images/hypervisor/mkosi.conf: if a pattern there stops matching, this fails.
REQUIRED_MODULES = (
    "kvm kvm_intel kvm_amd vhost_net vhost_vsock vhost_scsi irqbypass vfio_pci",  # virtualisation
    "virtio_net virtio_blk virtio_scsi virtio_rng",  # nodes that are VMs themselves
    "ahci nvme sd_mod megaraid_sas mpt3sas smartpqi hpsa mptsas loop nbd",  # storage
    "dm_mod dm_crypt dm_multipath raid1 raid456",  # software RAID, LVM, dm-crypt
    "e1000e igb ixgbe i40e ice mlx5_core bnxt_en tg3 bnx2x",  # wired NICs
    "tun tap macvtap veth vxlan geneve wireguard bonding",  # what VMs are wired with
    "bridge br_netfilter 8021q nf_tables nft_ct nft_nat nft_chain_nat nf_conntrack",  # stack
    "vmw_vsock_virtio_transport_common tls xfrm_user",
    "ext4 xfs vfat overlay squashfs erofs fuse isofs",  # file systems
    "aesni_intel xts dm_crypt sha256_ssse3 crc32c_intel",  # crypto
    "ipmi_si ipmi_devintf ipmi_ssif ipmi_watchdog iTCO_wdt lpc_ich tpm_crb edac_core",  # platform
    "xhci_pci ehci_pci usb_storage usbhid hid_generic ast mgag200",  # the local console
)
#: Classes a hypervisor does without (``kernel/<dir>``): no module of theirs may be in the image.
LEFT_OUT = (
    "sound", "drivers/net/wireless", "net/wireless", "net/mac80211", "drivers/bluetooth",
    "net/bluetooth", "drivers/media", "drivers/staging", "drivers/gpu/drm/amd",
    "drivers/gpu/drm/nouveau", "drivers/gpu/drm/i915", "drivers/iio", "drivers/input/joystick",
    "drivers/input/touchscreen", "net/can",
    # what the design does not use: SAN adapters, RDMA, network and cluster file systems,
    # Open vSwitch, embedded NIC families
    "drivers/scsi/lpfc", "drivers/scsi/qla2xxx", "drivers/scsi/fcoe", "drivers/infiniband",
    "fs/btrfs", "fs/nfs", "net/sunrpc", "net/ceph", "fs/dlm", "net/openvswitch", "net/sctp",
    "drivers/net/ethernet/stmicro", "drivers/net/ethernet/netronome", "drivers/thunderbolt",
)  # fmt: skip
# Pulled in as a dependency and kept: the ACPI-WMI bus (platform/x86/wmi.ko, for server
# sensors and ACPI video).


def test_the_module_set_is_hypervisor_sized(hypervisor_root: Path) -> None:
    (release,) = [p for p in (hypervisor_root / "usr/lib/modules").iterdir() if p.is_dir()]
    kernel = release / "kernel"
    present = {p.name.split(".ko")[0].replace("-", "_") for p in kernel.rglob("*.ko*")}
    builtin = {
        Path(line).name.split(".ko")[0].replace("-", "_")
        for line in (release / "modules.builtin").read_text().splitlines()
    }
    wanted = {name for line in REQUIRED_MODULES for name in line.split()}
    assert sorted(wanted - present - builtin) == []
    found = {out: sorted(p.name for p in (kernel / out).rglob("*.ko*")) for out in LEFT_OUT}
    assert {out: names for out, names in found.items() if names} == {}
    # every module left is one modprobe can load: modules.dep was regenerated for the set
    deps = (release / "modules.dep").read_text()
    assert "kernel/sound/" not in deps and "kernel/drivers/net/ethernet/intel/ice/ice.ko" in deps
    size = sum(p.stat().st_size for p in kernel.rglob("*.ko*"))
    assert size < 115e6, f"{size / 1e6:.0f} MB of modules"  # 106 MB in December 2026
