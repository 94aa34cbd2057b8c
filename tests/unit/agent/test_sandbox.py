"""Who a VM's QEMU runs as and what the agent trusts of the files QEMU makes (vms/sandbox)."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from hatchery.config import VmIsolationConfig, parse_config
from hatchery.errors import ConfigError
from hatchery.vms.sandbox import (
    QemuUser,
    SandboxError,
    VmFiles,
    checked_socket,
    kvm_problem,
    open_channels,
    open_untrusted,
    pick_uid,
    prepare,
)

UID = 0x7FF00000


def test_the_lowest_free_uid_of_the_range() -> None:
    config = VmIsolationConfig(uid_first=100_000, uid_count=3)
    assert pick_uid([], config) == 100_000
    assert pick_uid([None, 100_000, 100_002], config) == 100_001  # a gap left by a destroy
    with pytest.raises(SandboxError, match="no free VM uid") as err:
        pick_uid([100_000, 100_001, 100_002], config)
    assert err.value.hint and "uid_count" in err.value.hint


def test_config_vms() -> None:
    default = parse_config(None).vms
    assert default == VmIsolationConfig() and default.unprivileged
    # outside systemd's container (524288-1879048191) and foreign (0x7FFE0000+64Ki) ranges
    assert default.uid_first > 1879048191
    assert default.uid_first + default.uid_count <= 0x7FFE0000
    config = parse_config({"vms": {"unprivileged": False, "uid_first": 200_000}}).vms
    assert config == VmIsolationConfig(False, 200_000, default.uid_count)
    assert default.log_limit_bytes == 2 * 1024**2
    assert parse_config({"vms": {"log_limit_bytes": 65536}}).vms.log_limit_bytes == 65536
    for bad, key in (({"uid_first": 1000}, "vms.uid_first"),
                     ({"log_limit_bytes": 4096}, "vms.log_limit_bytes"),
                     ({"uid_count": 0}, "vms.uid_count"),
                     ({"uid_first": 2**31 - 10, "uid_count": 11}, "vms.uid_count"),
                     ({"runas": "qemu"}, "vms.runas"),
                     ({"unprivileged": "yes"}, "vms.unprivileged")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            parse_config({"vms": bad})


def test_setpriv_drops_everything() -> None:
    argv = QemuUser(UID, UID, (36,)).setpriv("/usr/bin/setpriv")
    assert argv[0] == "/usr/bin/setpriv" and argv[-1] == "--"
    for flag in (f"--reuid={UID}", f"--regid={UID}", "--groups=36", "--inh-caps=-all",
                 "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs"):  # fmt: skip
        assert flag in argv, flag
    assert "--clear-groups" in QemuUser(UID, UID).setpriv("setpriv")


def test_files_are_named_in_one_place(tmp_path: Path) -> None:
    files = VmFiles(tmp_path)
    assert files.rel(files.qmp) == "run/qmp" and files.rel(files.console_log) == "run/console.log"
    assert files.rel(files.disk) == "root.qcow2" and files.qemu_log == tmp_path / "qemu.log"
    legacy = VmFiles(tmp_path, legacy=True)  # a QEMU an older agent started: its sockets
    assert legacy.qmp == tmp_path / "qmp" and legacy.console_log == tmp_path / "console.log"


def test_prepare_hands_the_folder_over(tmp_path: Path) -> None:
    files = VmFiles(tmp_path / "vm")
    files.dir.mkdir()
    for path in (files.disk, files.kernel):
        path.write_bytes(b"x")
        path.chmod(0o600)
    (files.dir / "vm.json").write_text("{}")
    (files.dir / "console.log").write_text("old history\n")  # an older agent's place for it
    files.run.mkdir()
    os.chown(files.run, UID, UID)  # as an older agent left it: QEMU's own
    (files.run / "planted").symlink_to("/etc/shadow")  # left by a hostile QEMU
    os.mkfifo(files.run / "qmp")
    (files.run / "filler").write_bytes(b"x" * 4096)
    os.chown(files.run / "filler", UID, UID)
    prepare(files, QemuUser(UID, UID))

    def owner(path: Path) -> tuple[int, int, int]:
        st = path.lstat()
        return st.st_uid, st.st_gid, st.st_mode & 0o777

    assert owner(files.dir) == (0, UID, 0o710)
    # run/ is the agent's now: QEMU gets its sockets and log as descriptors, and has no
    # folder on the data disk it may write in
    assert owner(files.run) == (0, 0, 0o700)
    assert owner(files.disk) == (0, UID, 0o660) and owner(files.kernel) == (0, UID, 0o640)
    assert owner(files.dir / "vm.json")[:2] == (0, 0) and owner(files.qemu_log) == (0, 0, 0o600)
    assert sorted(p.name for p in files.run.iterdir()) == ["console.log", "filler"]
    assert files.console_log.read_text() == "old history\n"
    assert owner(files.console_log) == (0, 0, 0o600) and owner(files.run / "filler")[:2] == (0, 0)
    prepare(files, None)  # vms.unprivileged off: all root's again
    assert owner(files.dir) == (0, 0, 0o700) and owner(files.run)[:2] == (0, 0)
    assert owner(files.disk)[:2] == (0, 0)


def test_untrusted_files_are_never_read_through_links_or_fifos(tmp_path: Path) -> None:
    good = tmp_path / "console.log"
    good.write_text("boot\n")
    os.close(open_untrusted(good))
    secret = tmp_path / "agent.key"
    secret.write_text("PRIVATE KEY")
    link = tmp_path / "link.log"
    link.symlink_to(secret)
    with pytest.raises(OSError) as err:
        open_untrusted(link)
    assert err.value.errno == errno.ELOOP
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):  # and it did not block
        open_untrusted(fifo)


def test_qmp_is_reached_only_on_the_vms_own_socket(tmp_path: Path) -> None:
    path = tmp_path / "qmp"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        fd = checked_socket(path, (UID, 0))
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(f"/proc/self/fd/{fd}")  # how the monitor connects
        finally:
            os.close(fd)
        with pytest.raises(OSError, match="not the VM's socket"):
            checked_socket(path, (UID,))  # root's, not the VM's
        other = tmp_path / "other"
        other.symlink_to(path)  # a hostile QEMU pointing at another VM's monitor
        with pytest.raises(OSError, match="not the VM's socket"):  # O_PATH: the link itself
            checked_socket(other, (UID, 0))


def test_kvm_device_must_be_open_to_the_kvm_group(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    device.chmod(0o600)  # how this test machine has it: root only
    problem = kvm_problem(device)
    assert problem is not None and "mode 600" in problem
    device.chmod(0o666)
    assert kvm_problem(device) is None
    assert kvm_problem(tmp_path / "missing") is not None


def test_qemu_gets_its_sockets_and_console_log_as_descriptors(tmp_path: Path) -> None:
    # a state folder deep enough that a socket path under it would pass sun_path's 108 bytes
    files = VmFiles(tmp_path / ("d" * 60) / ("e" * 60) / "vm")
    files.dir.mkdir(parents=True)
    prepare(files, QemuUser(UID, UID))
    files.qmp.write_text("stale")  # replaced by a fresh socket
    channels = open_channels(files)
    try:
        assert stat.S_ISSOCK(files.qmp.lstat().st_mode) and files.console.lstat().st_uid == 0
        with socket.socket(socket.AF_UNIX) as client:  # how the agent reaches QMP
            fd = checked_socket(files.qmp, (UID, 0))
            try:
                client.connect(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            accepted, _ = channels.qmp.accept()
            accepted.close()
        os.write(channels.console_log, b"appended\n")
        assert files.console_log.read_bytes() == b"appended\n"
        assert os.stat(files.console_log).st_mode & 0o777 == 0o600
    finally:
        channels.close()
    incoming = open_channels(files, incoming=True)  # a refresh: the old QEMU keeps its names
    incoming.close()
    assert {p.name for p in files.run.iterdir()} >= {"qmp", "qmp.next", "console.next"}
    files.console_log.unlink()
    files.console_log.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SandboxError, match="console log"):
        open_channels(files)
    assert not (tmp_path / "elsewhere").exists()
