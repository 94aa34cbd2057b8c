"""``vms.logtrim``: a log QEMU appends to is cut from the front, in place, while QEMU writes.

Real files on the file systems the agent meets: the test's own folder (ext4 on this
machine: ``FALLOC_FL_COLLAPSE_RANGE``) and /dev/shm (tmpfs: no collapse, the punched-hole
fallback).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchery.vms import limits
from hatchery.vms.logtrim import PUNCHED_FACTOR, trim

ME = (os.getuid(),)
LIMIT = 256 * 1024


@pytest.fixture(params=["tmp_path", "/dev/shm"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "tmp_path":
        yield tmp_path
        return
    shm = Path(request.param)
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    here = shm / f"logtrim-{os.getpid()}-{threading.get_ident()}"
    here.mkdir()
    try:
        yield here
    finally:
        for child in here.iterdir():
            child.unlink()
        here.rmdir()


def _used(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_a_log_within_its_limit_is_left_alone(folder: Path) -> None:
    log = folder / "console.log"
    assert trim(log, LIMIT, ME) == 0  # missing: nothing to do
    log.write_bytes(b"boot\n" * 1000)
    assert trim(log, LIMIT, ME) == 0
    assert log.read_bytes() == b"boot\n" * 1000


def test_the_oldest_bytes_go_and_the_newest_stay_while_the_writer_appends(folder: Path) -> None:
    log = folder / "console.log"
    lines = [f"line {i:07d}\n".encode() for i in range(200_000)]  # 13 bytes each: 2.6 MB
    with log.open("ab") as qemu:  # QEMU's logappend=on: O_APPEND
        for index, line in enumerate(lines):
            qemu.write(line)
            if index % 20_000 == 0:
                qemu.flush()
                trim(log, LIMIT, ME)
        qemu.flush()
        freed = trim(log, LIMIT, ME)
        assert freed > 0
        assert _used(log) <= LIMIT
        if not str(folder).startswith("/dev/shm"):  # ext4 collapses: the file is shorter
            assert log.stat().st_size <= LIMIT
        qemu.write(b"after the cut\n")  # the writer goes on at the (new) end
        qemu.flush()
    data = log.read_bytes().lstrip(b"\0")  # a punched hole reads as zeros
    assert data.endswith(lines[-1] + b"after the cut\n")
    assert len(data) >= LIMIT // 2 - 4096  # about half the limit kept, cut on a block
    whole = data[data.index(b"\n") + 1 :]  # the first line may have lost its start
    assert whole.splitlines(keepends=True) == [*lines[-(whole.count(b"\n") - 1) :],
                                               b"after the cut\n"]  # fmt: skip


def test_what_is_not_the_vms_own_log_is_never_cut(tmp_path: Path) -> None:
    target = tmp_path / "agent-secret"
    target.write_bytes(b"s" * (LIMIT * 2))
    link = tmp_path / "console.log"
    link.symlink_to(target)
    with pytest.raises(OSError):
        trim(link, LIMIT, ME)
    hard = tmp_path / "hard.log"
    os.link(target, hard)
    with pytest.raises(OSError, match="2 links"):
        trim(hard, LIMIT, ME)
    hard.unlink()
    with pytest.raises(OSError, match="not a log of the VM's"):
        trim(target, LIMIT, (ME[0] + 1,))  # another uid's file
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        trim(fifo, LIMIT, ME)  # O_NONBLOCK: no reader, refused at once, never blocks
    assert target.read_bytes() == b"s" * (LIMIT * 2)


def test_a_log_that_can_only_be_punched_never_grows_to_qemus_file_size_limit() -> None:
    # /dev/shm (tmpfs) cannot collapse: the apparent size would grow with every punch until
    # QEMU's RLIMIT_FSIZE (vms.limits: at least 2 x PUNCHED_FACTOR limits) ended it
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    log = shm / f"logtrim-punched-{os.getpid()}.log"
    try:
        with log.open("ab") as qemu:
            chunk = b"x" * (LIMIT // 2)
            largest = 0
            for _ in range(4 * PUNCHED_FACTOR):  # a guest printing on
                qemu.write(chunk * 3)
                qemu.flush()
                largest = max(largest, log.stat().st_size)
                trim(log, LIMIT, ME)
                assert _used(log) <= LIMIT
                if log.stat().st_size == 0:  # past the factor: emptied
                    break
            assert log.stat().st_size == 0, "a punched log was never emptied"
            assert PUNCHED_FACTOR * LIMIT < largest <= (PUNCHED_FACTOR + 2) * LIMIT
            qemu.write(b"next line\n")  # the appends start over at the front
            qemu.flush()
        assert log.read_bytes() == b"next line\n"
        assert PUNCHED_FACTOR * LIMIT * 2 <= limits.LOG_FILE_FACTOR * LIMIT
    finally:
        log.unlink(missing_ok=True)
