"""Who a VM's QEMU runs as, and which of the VM's files it may touch.

Each VM has a uid of its own (gid = uid, from ``vms.uid_first``/``uid_count``; no
/etc/passwd entry). QEMU is started as root inside its scope, then ``setpriv`` drops to that
uid with no capabilities, an empty bounding set and ``no_new_privs`` before it execs QEMU;
QEMU's own seccomp filter (``-sandbox``) follows. (QEMU's ``-runas`` is not used: on QEMU
7.2 its own ``elevateprivileges=deny`` filter kills the ``setuid`` it would make.)

What QEMU may reach is decided by the folder of its VM, which is its working directory
(the agent ``chdir``s there as root before dropping): every path QEMU is given is relative,
so QEMU needs no search permission on the agent's state directory (0700, root) above it.

======================  ======================  =====  =====================================
path (in ``vms/NAME``)  owner                   mode   why
======================  ======================  =====  =====================================
``.``                   root:VM gid             0710   QEMU may enter, not list or write
``vm.json``             root                    0600   the agent's record: QEMU cannot touch
``qemu.log``            root                    0600   QEMU's output, written through an fd
``root.qcow2``          root:VM gid             0660   the disk: QEMU reads and writes it
``kernel``, ``initrd``  root:VM gid             0640   read only
``run/``                root                    0700   the QMP and console sockets, bound by
                                                       the agent, and ``console.log``: QEMU
                                                       gets each as a descriptor
======================  ======================  =====  =====================================

So QEMU can create no file on the node's data disk: it has no folder there it may write.
What it writes goes to the three files it is handed (the disk, its output and the console
log), each held below its file size limit (``RLIMIT_FSIZE``, ``vms.limits``), and the logs
are cut to ``vms.log_limit_bytes`` (``vms.logtrim``). A QEMU told to write elsewhere (a guest
memory dump, a migration to a file, a block job's target) finds only the node's RAM file
systems (/tmp, /dev/shm), charged to its own memory limit.

A VM whose QEMU an older agent started may still have sockets and a ``console.log`` its
uid made in ``run/``: the agent opens files there without following symlinks and only if they
are what they should be (``open_untrusted``, ``checked_socket``), and puts ``run/`` right
at the VM's next start. Another VM's uid can enter neither this folder (0710, other gid) nor
``run/``, and its tap belongs to this VM's uid (see ``netdev``).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import shutil
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hatchery.config import VmIsolationConfig
from hatchery.errors import HatcheryError

log = logging.getLogger(__name__)


class SandboxError(HatcheryError):
    """QEMU cannot be confined as configured."""


@dataclass(frozen=True, slots=True)
class VmFiles:
    """The files of one VM, by name: the one place that names them.

    ``legacy``: a QEMU started by an agent from before per-VM users (its record has no uid)
    keeps its sockets and console log in the VM's folder itself until its next start.
    """

    dir: Path
    legacy: bool = False

    @property
    def run(self) -> Path:
        return self.dir if self.legacy else self.dir / "run"

    @property
    def qmp(self) -> Path:
        return self.run / "qmp"

    @property
    def console(self) -> Path:
        return self.run / "console"

    @property
    def qmp_next(self) -> Path:
        """The QMP socket of the QEMU a refresh starts, renamed to ``qmp`` once it has won."""
        return self.run / "qmp.next"

    @property
    def console_next(self) -> Path:
        return self.run / "console.next"

    @property
    def saved(self) -> Path:
        """A suspended guest's state (RAM and devices), the agent's file: QEMU never opens it."""
        return self.dir / "suspend.state"

    @property
    def console_log(self) -> Path:
        return self.run / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def disk(self) -> Path:
        return self.dir / "root.qcow2"

    @property
    def kernel(self) -> Path:
        return self.dir / "kernel"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd"

    def rel(self, path: Path) -> str:
        """``path`` as QEMU is given it: relative to the folder, its working directory."""
        return str(path.relative_to(self.dir))


@dataclass(frozen=True, slots=True)
class QemuUser:
    """The credentials QEMU runs with; ``groups``: supplementary (``kvm`` where it exists)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def setpriv(self, binary: str) -> list[str]:
        """The prefix that drops to this user before exec: no capabilities (inheritable,
        ambient and bounding set cleared), ``no_new_privs`` so no setuid file regains any."""
        groups = f"--groups={','.join(map(str, self.groups))}" if self.groups else "--clear-groups"
        return [binary, f"--reuid={self.uid}", f"--regid={self.gid}", groups,
                "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                "--no-new-privs", "--"]  # fmt: skip


def pick_uid(used: Iterable[int | None], config: VmIsolationConfig) -> int:
    """The lowest uid of the configured range that no VM holds.

    :raise SandboxError: every uid of the range is taken.
    """
    taken = {u for u in used if u is not None}
    for uid in range(config.uid_first, config.uid_first + config.uid_count):
        if uid not in taken:
            return uid
    raise SandboxError(
        f"no free VM uid in {config.uid_first}+{config.uid_count}",
        hint="widen vms.uid_count in the agent's config",
    )


def kvm_gid() -> int | None:
    """The ``kvm`` group (owner of /dev/kvm, 0660, under Debian's udev rules), if any."""
    try:
        return grp.getgrnam("kvm").gr_gid
    except KeyError:
        return None


def kvm_problem(device: Path = Path("/dev/kvm")) -> str | None:
    """Why a QEMU in the ``kvm`` group (and no other) could not open ``device``; None if
    it can. Debian's udev makes it 0660 root:kvm; a node that makes it 0600 needs its own
    rule, or ``vms.unprivileged: false``."""
    try:
        st = device.stat()
    except OSError as exc:
        return f"{device}: {exc.strerror}"
    kvm = kvm_gid()
    if st.st_mode & 0o006 == 0o006 or (kvm == st.st_gid and st.st_mode & 0o060 == 0o060):
        return None
    return (f"{device} is mode {st.st_mode & 0o777:o}, group {st.st_gid}: not read-write "
            f"for the kvm group ({'missing' if kvm is None else kvm})")  # fmt: skip


def qemu_user(uid: int) -> QemuUser:
    kvm = kvm_gid()
    return QemuUser(uid, uid, (kvm,) if kvm is not None else ())


def setpriv_binary() -> str:
    """:raise SandboxError: ``setpriv`` (util-linux) is not installed."""
    found = shutil.which("setpriv")
    if found is None:
        raise SandboxError(
            "setpriv (util-linux) is not installed: QEMU cannot drop to its own user",
            hint="install util-linux, or set vms.unprivileged: false",
        )
    return found


def prepare(files: VmFiles, user: QemuUser | None) -> None:
    """Give the VM's files the owners and modes of the table above (``user`` None: QEMU
    runs as root, everything root's). Done at every start, so files of a VM made by an
    older agent, or left by a start under other settings, are put right.

    :raise SandboxError: an owner or mode cannot be set.
    """
    try:
        _prepare(files, user)
    except OSError as exc:
        raise SandboxError(f"cannot prepare {exc.filename or files.dir} for QEMU: "
                           f"{exc.strerror or exc}") from exc  # fmt: skip


def _prepare(files: VmFiles, user: QemuUser | None) -> None:
    gid = user.gid if user is not None else 0
    os.chown(files.dir, 0, gid, follow_symlinks=False)
    os.chmod(files.dir, 0o710 if user is not None else 0o700)
    run = files.run
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(run).st_mode):  # not ours: QEMU makes only sockets
            run.unlink()
    run.mkdir(mode=0o700, exist_ok=True)
    if not files.legacy:  # the agent's own from now on (an older agent gave it to QEMU)
        os.chown(run, 0, 0, follow_symlinks=False)
        os.chmod(run, 0o700)
    for entry in run.iterdir():  # sockets are bound anew at each start; files become root's
        mode = os.lstat(entry).st_mode
        if stat.S_ISREG(mode):
            os.chown(entry, 0, 0, follow_symlinks=False)
            if not files.legacy:  # no one but the agent can swap it now: run/ is root's
                os.chmod(entry, 0o600)
        elif not stat.S_ISDIR(mode):
            entry.unlink()
    for path, mode in ((files.disk, 0o660), (files.kernel, 0o640), (files.initrd, 0o640)):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.lstat(path).st_mode):  # the agent made them: never a link
                os.chown(path, 0, gid)
                os.chmod(path, mode)
    fd = os.open(files.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:  # the agent's record of what QEMU said; QEMU writes it through an inherited fd
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    if not files.legacy:
        old = files.dir / "console.log"  # where an older agent kept it: keep its history
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.lstat(old).st_mode):
                os.replace(old, files.console_log)
                os.chown(files.console_log, 0, 0, follow_symlinks=False)
                os.chmod(files.console_log, 0o600)


@dataclass(slots=True)
class QemuChannels:
    """What a VM's QEMU is handed as descriptors instead of paths it would write: the
    listening QMP and console sockets (bound by the agent in ``run/``) and the console log
    (opened by the agent for appending). The agent closes its copies once QEMU runs."""

    qmp: socket.socket
    console: socket.socket
    console_log: int

    def fds(self) -> tuple[int, ...]:
        return self.qmp.fileno(), self.console.fileno(), self.console_log

    def close(self) -> None:
        self.qmp.close()
        self.console.close()
        with contextlib.suppress(OSError):
            os.close(self.console_log)


def open_channels(files: VmFiles, *, incoming: bool = False) -> QemuChannels:
    """Bind the QMP and console sockets (``*.next`` for an ``incoming`` QEMU, while the one
    it replaces still has the usual names) and open the console log, for a QEMU about to be
    started. Names are resolved under an ``O_PATH`` descriptor of ``run/`` (short socket
    paths whatever the state folder's, and no symlink followed on the way). ``run/`` and the
    log become root's here too, for a VM an older agent started that is refreshed (its
    QEMU keeps the descriptors it has; ``prepare`` does the rest at its next start).

    :raise SandboxError: a socket cannot be bound or the log is not a regular file.
    """
    names = (files.qmp_next, files.console_next) if incoming else (files.qmp, files.console)
    opened: list[socket.socket] = []
    try:
        run = os.open(files.run, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(f"cannot open {files.run}: {exc.strerror}") from exc
    try:
        if not files.legacy:
            os.chown(f"/proc/self/fd/{run}", 0, 0)  # the folder itself, by its descriptor
            os.chmod(f"/proc/self/fd/{run}", 0o700)
        for path in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.name, dir_fd=run)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            opened.append(listener)
            listener.bind(f"/proc/self/fd/{run}/{path.name}")
            listener.listen(4)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        log_fd = os.open(files.console_log.name, flags | os.O_CLOEXEC, 0o600, dir_fd=run)
        if not stat.S_ISREG(os.fstat(log_fd).st_mode):
            os.close(log_fd)
            raise OSError(errno.EINVAL, f"{files.console_log.name} is not a regular file")
        os.set_blocking(log_fd, True)
        if not files.legacy:
            os.fchown(log_fd, 0, 0)
            os.fchmod(log_fd, 0o600)
    except OSError as exc:
        for listener in opened:
            listener.close()
        raise SandboxError(f"cannot prepare the sockets and console log of {files.dir.name}: "
                           f"{exc.strerror or exc}") from exc  # fmt: skip
    finally:
        os.close(run)
    return QemuChannels(opened[0], opened[1], log_fd)


def open_untrusted(path: Path) -> int:
    """Open for reading a file that a hostile QEMU may have replaced: never through a
    symlink, never blocking (a FIFO), and only a regular file.

    :raise OSError: it does not exist, is a symlink (``ELOOP``) or is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path.name} is not a regular file")
    return fd


def read_tail(path: Path, want: int) -> bytes:
    """The last ``want`` bytes of a file a hostile QEMU writes (``open_untrusted``).

    :raise OSError: as ``open_untrusted``.
    """
    with os.fdopen(open_untrusted(path), "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - want, 0))
        return f.read(want)


def socket_owners(uid: int | None) -> tuple[int, ...]:
    """Who may own a VM's sockets: its QEMU's uid, or root (a QEMU started as root: an older
    agent's VM, or ``vms.unprivileged: false``)."""
    return (0,) if uid is None else (uid, 0)


def checked_socket(path: Path, owners: Iterable[int]) -> int:
    """An ``O_PATH`` descriptor of the socket at ``path`` if it is a socket (not a symlink
    to one) owned by one of ``owners``; connect through ``/proc/self/fd/N``, so a QEMU that
    swaps the name for another VM's socket between the check and the connect gains nothing.

    :raise OSError: missing, a symlink, not a socket, or someone else's.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in set(owners):
        os.close(fd)
        raise OSError(errno.EPERM, f"{path.name} is not the VM's socket (uid {st.st_uid})")
    return fd
