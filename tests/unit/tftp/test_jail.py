"""Path resolution below the served root: what is served and what is refused, and why."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchery.tftp.jail import OpenedFile, Refused, _refusal, open_in_root
from hatchery.tftp.packet import ErrorCode


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """root/ with files, a subdir, symlinks in and out; a secret next to it."""
    (tmp_path / "secret").write_text("secret\n")
    root = tmp_path / "root"
    (root / "ipxe").mkdir(parents=True)
    (root / "ipxe" / "undionly.kpxe").write_bytes(b"kpxe")
    (root / "boot.ipxe").write_text("#!ipxe\n")
    (root / "inside").symlink_to("ipxe/undionly.kpxe")
    (root / "escape").symlink_to("../secret")
    (root / "escape-abs").symlink_to(tmp_path / "secret")
    (root / "escape-dir").symlink_to(tmp_path)
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")
    return root


def _open(root: Path, name: str) -> Iterator[OpenedFile]:
    opened = open_in_root(os.path.realpath(root), name)
    try:
        yield opened
    finally:
        os.close(opened.fd)


def _read(root: Path, name: str) -> bytes:
    for opened in _open(root, name):
        return os.pread(opened.fd, opened.size, 0)
    raise AssertionError


def _refused(root: Path, name: str) -> Refused:
    with pytest.raises(Refused) as info:
        _read(root, name)
    return info.value


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("boot.ipxe", b"#!ipxe\n"),
        ("ipxe/undionly.kpxe", b"kpxe"),
        ("./ipxe//undionly.kpxe", b"kpxe"),
        ("ipxe\\undionly.kpxe", b"kpxe"),  # Windows loaders send backslashes
        ("inside", b"kpxe"),  # a symlink that stays inside the root
    ],
)
def test_served(root: Path, name: str, content: bytes) -> None:
    assert _read(root, name) == content


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../secret", "'..' is not allowed"),
        ("ipxe/../../secret", "'..' is not allowed"),
        ("..\\secret", "'..' is not allowed"),
        ("/etc/passwd", "absolute paths"),
        ("\\etc\\passwd", "absolute paths"),
        ("escape", "outside the served root"),
        ("escape-abs", "outside the served root"),
        ("escape-dir/secret", "outside the served root"),
        ("ipxe", "not a regular file"),
        (".", "not a regular file"),
        ("fifo", "not a regular file"),  # and opening it did not block
    ],
)
def test_access_violations(root: Path, name: str, why: str) -> None:
    refused = _refused(root, name)
    assert refused.code == ErrorCode.ACCESS_VIOLATION
    assert why in refused.message


@pytest.mark.parametrize(
    "name", ["missing", "ipxe/missing", "boot.ipxe/below", "dangling", "x" * 5000]
)
def test_missing_is_file_not_found(root: Path, name: str) -> None:
    refused = _refused(root, name)
    assert refused.code == ErrorCode.FILE_NOT_FOUND


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.EACCES, ErrorCode.ACCESS_VIOLATION),  # what an unreadable file gives non-root
        (errno.EPERM, ErrorCode.ACCESS_VIOLATION),
        (errno.ELOOP, ErrorCode.ACCESS_VIOLATION),  # O_NOFOLLOW met a swapped-in symlink
        (errno.ENOENT, ErrorCode.FILE_NOT_FOUND),
        (errno.EIO, ErrorCode.NOT_DEFINED),
    ],
)
def test_open_errors_map_to_tftp_errors(err: int, code: ErrorCode) -> None:
    assert _refusal(OSError(err, os.strerror(err))).code == code


def test_size_is_reported(root: Path) -> None:
    for opened in _open(root, "boot.ipxe"):
        assert opened.size == 7
        assert opened.path == str(root / "boot.ipxe")
