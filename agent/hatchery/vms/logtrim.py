"""Files a guest can fill, kept to a size: a VM's console log and its QEMU's own output.

QEMU appends everything the guest prints on its serial console to ``run/console.log``
(``logfile=``, ``logappend=on``): a guest that prints without end would fill /data, which
every VM and the node's own state share. Measured under TCG on this project's 2-core
machine, a busybox guest writes its serial port at about 1.2 MB/s; under KVM each byte is
one exit, so a few MB/s. QEMU has no size limit for a chardev log, so the agent keeps one
(``VmManager`` calls ``trim`` every ``TRIM_INTERVAL`` seconds for every running VM, and at
start-up): once a file holds more than ``limit`` bytes, its oldest bytes are cut off the
front, in place, leaving the newest ``limit // 2``.

In place, because QEMU holds the file open for appending: renaming it away (logrotate's
way) would leave QEMU writing to the old name; copying and truncating loses what QEMU writes
in between. ``fallocate(FALLOC_FL_COLLAPSE_RANGE)`` removes whole blocks from the front
under the inode lock, so every append lands after it (ext4 and XFS have it; /data is ext4).
A file system without it gets ``FALLOC_FL_PUNCH_HOLE``: the blocks are freed, the apparent
size stays; and one without either, a truncation to zero (logged). A punched file is
emptied too once its apparent size passes ``PUNCHED_FACTOR`` times the limit: QEMU appends
at the end, and its file size limit (``vms.limits``, at least twice that) must never be
reached by a log that holds only ``limit`` bytes.

``console.log`` is in the VM's ``run/``: the agent's since QEMU gets its log as a
descriptor, its QEMU's uid's for a VM an older agent started. It is opened without
following a symlink, and cut only if it is a regular file of root or that uid with one
link (a hostile QEMU could otherwise point the agent at a file it cannot write itself).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

#: Seconds between two checks; what a guest can write meanwhile is the overshoot.
TRIM_INTERVAL = 2.0
#: A log whose front can only be punched is emptied once it looks this many limits long.
PUNCHED_FACTOR = 32

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_COLLAPSE_RANGE = 0x08
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def trim(path: Path, limit: int, owners: Iterable[int]) -> int:
    """Cut the oldest bytes of ``path`` once it holds more than ``limit`` bytes on disk;
    the bytes freed (0 when it is within its limit or missing).

    ``owners``: the uids the file may belong to.

    :raise OSError: it is not a regular file of one of ``owners`` with a single link, or
        cannot be cut at all.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in set(owners):
            raise OSError(errno.EPERM, f"{path.name} is not a log of the VM's (uid {st.st_uid}, "
                                       f"{st.st_nlink} links)")  # fmt: skip
        used = st.st_blocks * 512
        if used <= limit:
            return 0
        block = os.fstatvfs(fd).f_bsize
        cut = (st.st_size - limit // 2) // block * block
        if cut <= 0:
            return 0
        try:
            _fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, cut)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            try:
                if st.st_size > PUNCHED_FACTOR * limit:
                    log.info("%s: %d bytes long, punched at the front: emptied", path,
                             st.st_size)  # fmt: skip
                    os.ftruncate(fd, 0)
                else:
                    _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, cut)
            except OSError as exc2:
                if exc2.errno not in _UNSUPPORTED:
                    raise
                log.warning("%s: its file system can neither collapse nor punch a range: "
                            "emptied", path)  # fmt: skip
                os.ftruncate(fd, 0)
        return max(used - os.fstat(fd).st_blocks * 512, 0)
    finally:
        os.close(fd)
