"""The one path jail and its two users: what is served, what is refused, and why.

``hatchery.jail`` is tested directly; then the same attack names go through each server
that uses it, TFTP (``open_boot_file``, what the server calls for a read request) and boot
HTTP (the real app on aiohttp's test server), so neither can drift from the other.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from hatchery import jail
from hatchery.boothttp.app import BootHttpConfig, make_app
from hatchery.jail import Reason, Refused, check_opened, open_in_root, refusal
from hatchery.tftp.packet import ErrorCode
from hatchery.tftp.server import Refused as TftpRefused
from hatchery.tftp.server import open_boot_file


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


def _read(root: Path, name: str) -> bytes:
    opened = open_in_root(root, name)
    try:
        return os.pread(opened.fd, opened.size, 0)
    finally:
        os.close(opened.fd)


def _refused(root: Path, name: str) -> Refused:
    with pytest.raises(Refused) as info:
        _read(root, name)
    return info.value


SERVED = [
    ("boot.ipxe", b"#!ipxe\n"),
    ("ipxe/undionly.kpxe", b"kpxe"),
    ("./ipxe//undionly.kpxe", b"kpxe"),
    ("inside", b"kpxe"),  # a symlink that stays inside the root
]

#: Names every user of the jail must refuse, with the jail's reason.
ATTACKS = [
    ("../secret", "'..' is not allowed"),
    ("ipxe/../../secret", "'..' is not allowed"),
    ("ipxe/..", "'..' is not allowed"),
    ("/etc/passwd", "absolute paths"),
    (str(Path(__file__).resolve()), "absolute paths"),
    ("escape", "outside the served root"),  # a relative symlink out
    ("escape-abs", "outside the served root"),  # an absolute symlink out
    ("escape-dir/secret", "outside the served root"),  # a directory symlink out
    ("ipxe", "not a regular file"),
    (".", "not a regular file"),
    ("fifo", "not a regular file"),  # and opening it did not block
]

MISSING = ["missing", "ipxe/missing", "boot.ipxe/below", "dangling", "x" * 5000, "nul\0byte"]


@pytest.mark.parametrize(("name", "content"), SERVED)
def test_served(root: Path, name: str, content: bytes) -> None:
    assert _read(root, name) == content


@pytest.mark.parametrize(("name", "why"), ATTACKS)
def test_attacks_are_forbidden(root: Path, name: str, why: str) -> None:
    refused = _refused(root, name)
    assert refused.reason is Reason.FORBIDDEN
    assert why in refused.message


@pytest.mark.parametrize("name", MISSING)
def test_missing_is_not_found(root: Path, name: str) -> None:
    assert _refused(root, name).reason is Reason.NOT_FOUND


def test_a_symlinked_root_is_followed_once(root: Path, tmp_path: Path) -> None:
    (tmp_path / "link-to-root").symlink_to(root)
    assert _read(tmp_path / "link-to-root", "boot.ipxe") == b"#!ipxe\n"
    assert _refused(tmp_path / "link-to-root", "escape").reason is Reason.FORBIDDEN


def test_the_opened_descriptor_is_checked_again(root: Path, tmp_path: Path) -> None:
    """What catches a directory swapped for a symlink between the check and the open: the
    descriptor's real path (/proc/self/fd) must lie in the root, whatever name opened it."""
    fd = os.open(tmp_path / "secret", os.O_RDONLY)
    try:
        with pytest.raises(Refused, match="outside the served root") as info:
            check_opened(os.path.realpath(root), fd, str(root / "looks-inside"))
        assert info.value.reason is Reason.FORBIDDEN
    finally:
        os.close(fd)
    inside = os.open(root / "boot.ipxe", os.O_RDONLY)
    try:
        check_opened(os.path.realpath(root), inside, str(root / "boot.ipxe"))
    finally:
        os.close(inside)


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (errno.EACCES, Reason.FORBIDDEN),  # what an unreadable file gives non-root
        (errno.EPERM, Reason.FORBIDDEN),
        (errno.ELOOP, Reason.FORBIDDEN),  # O_NOFOLLOW met a swapped-in symlink
        (errno.ENOENT, Reason.NOT_FOUND),
        (errno.EIO, Reason.FAILED),
    ],
)
def test_open_errors_map_to_reasons(err: int, reason: Reason) -> None:
    assert refusal(OSError(err, os.strerror(err))).reason is reason


def test_size_and_path_are_reported(root: Path) -> None:
    opened = open_in_root(root, "boot.ipxe")
    os.close(opened.fd)
    assert opened.size == 7
    assert opened.path == os.path.realpath(root / "boot.ipxe")


# --- user 1: TFTP ----------------------------------------------------------------------------
def _tftp_refusal(root: Path, name: str) -> TftpRefused:
    with pytest.raises(TftpRefused) as info:
        os.close(open_boot_file(os.path.realpath(root), name).fd)
    return info.value


@pytest.mark.parametrize(("name", "why"), ATTACKS)
def test_tftp_refuses_the_attacks_as_access_violations(root: Path, name: str, why: str) -> None:
    refused = _tftp_refusal(root, name)
    assert refused.code == ErrorCode.ACCESS_VIOLATION and why in refused.message


@pytest.mark.parametrize(
    ("name", "why"),
    [("..\\secret", "'..' is not allowed"), ("\\etc\\passwd", "absolute paths")],
)
def test_tftp_backslashes_are_separators(root: Path, name: str, why: str) -> None:
    # Windows PXE loaders send backslashes; they cannot smuggle '..' or a leading '/'.
    assert why in _tftp_refusal(root, name).message
    opened = open_boot_file(os.path.realpath(root), "ipxe\\undionly.kpxe")
    os.close(opened.fd)
    assert opened.size == 4


@pytest.mark.parametrize("name", MISSING)
def test_tftp_missing_is_file_not_found(root: Path, name: str) -> None:
    assert _tftp_refusal(root, name).code == ErrorCode.FILE_NOT_FOUND


def test_tftp_maps_every_reason() -> None:
    from hatchery.tftp.server import _JAIL_CODES

    assert set(_JAIL_CODES) == set(jail.Reason)


# --- user 2: boot HTTP -----------------------------------------------------------------------
@pytest.fixture
async def http(root: Path) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(BootHttpConfig(root, None)))) as client:
        yield client


def _artefact_url(name: str) -> URL:
    """The request line as an attacker writes it: every byte but letters and digits
    percent-encoded, so no client-side normalisation removes a ``..`` before the server."""
    quoted = "".join(chr(b) if chr(b).isalnum() else f"%{b:02X}" for b in name.encode())
    return URL("/artefacts/" + quoted, encoded=True)


@pytest.mark.parametrize(("name", "content"), SERVED)
async def test_http_serves(http: TestClient, name: str, content: bytes) -> None:
    resp = await http.get(_artefact_url(name))
    assert resp.status == 200 and await resp.read() == content


@pytest.mark.parametrize(("name", "why"), [*ATTACKS, *((m, "") for m in MISSING)])
async def test_http_refuses_with_a_bare_404(http: TestClient, name: str, why: str) -> None:
    resp = await http.get(_artefact_url(name))
    text = await resp.text()
    assert resp.status == 404, name
    assert "secret" not in text.replace(name, "")  # nothing from outside the root
    assert "outside" not in text and "regular" not in text  # the reason stays in the log


async def test_http_sends_ranges_from_the_checked_descriptor(http: TestClient, root: Path) -> None:
    resp = await http.get("/artefacts/ipxe/undionly.kpxe", headers={"Range": "bytes=1-2"})
    assert resp.status == 206 and await resp.read() == b"px"
    # Every descriptor the jail opened was closed once the response was sent.
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert (await http.get("/artefacts/boot.ipxe")).status == 200
    assert len(os.listdir("/proc/self/fd")) <= before + 2


def test_an_answer_never_sent_still_closes_its_descriptor(root: Path) -> None:
    from hatchery.boothttp.app import _OpenedFileResponse
    from hatchery.boothttp.pump import SendfilePump

    opened = open_in_root(root, "boot.ipxe")
    response = _OpenedFileResponse(opened, SendfilePump())
    os.fstat(opened.fd)  # open while the response may still be sent
    del response  # the client went away before aiohttp prepared it
    with pytest.raises(OSError) as err:
        os.fstat(opened.fd)
    assert err.value.errno == errno.EBADF
