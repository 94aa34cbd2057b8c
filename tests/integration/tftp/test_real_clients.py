"""Our TFTP server (``hatchery-agent serve tftp``) against clients no one here wrote: curl and
atftp fetch files bit-exact, with and without blksize/tsize/windowsize, across the 16-bit
block-number wrap; refusals come back as TFTP errors. Loopback, ephemeral ports, no root."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

AGENT = Path(sys.executable).parent / "hatchery-agent"
SIZES = {"1k": 1024, "5m": 5_000_000, "40m": 40_000_000}
# curl's exit codes for TFTP errors 1 (file not found) and 2 (access violation).
CURL_NOT_FOUND, CURL_ACCESS_VIOLATION = 68, 69

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Served:
    root: Path
    port: int
    secret: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("tftp")
    secret = base / "secret"
    secret.write_text("outside the root\n")
    root = base / "root"
    root.mkdir()
    for name, size in SIZES.items():
        (root / name).write_bytes(os.urandom(size))
    (root / "sub").mkdir()
    (root / "sub" / "inner").write_bytes(b"inner\n")
    (root / "escape").symlink_to(secret)
    (root / "inside").symlink_to("sub/inner")
    log = base / "server.log"
    argv = [str(AGENT), "serve", "tftp", "--root", str(root), "--listen", "127.0.0.1:0"]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (match := re.search(r"TFTP serving .* on 127\.0\.0\.1:(\d+)", log.read_text())):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield Served(root, int(match.group(1)), secret)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, log.read_text()


@pytest.fixture
def curl(require_tool: Callable[[str], str]) -> str:
    return require_tool("curl")


@pytest.fixture
def atftp(require_tool: Callable[[str], str]) -> str:
    return require_tool("atftp")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)


def _same(path: Path, expected: Path) -> None:
    assert path.stat().st_size == expected.stat().st_size
    assert path.read_bytes() == expected.read_bytes()


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("blksize", [None, 1468])
def test_curl_fetches_bit_exact(
    curl: str, served: Served, tmp_path: Path, name: str, blksize: int | None
) -> None:
    # At curl's default 512-byte blocks, 40 MB is 78 125 blocks: the block number wraps.
    out = tmp_path / name
    options = ["--tftp-blksize", str(blksize)] if blksize else []
    result = _run([curl, "-sS", *options, "-o", str(out), f"tftp://127.0.0.1:{served.port}/{name}"])
    assert result.returncode == 0, result.stderr
    _same(out, served.root / name)


ATFTP_OPTIONS = {
    "blksize+tsize+windowsize16": ["blksize 1468", "tsize 0", "windowsize 16"],
    "lock-step-512": [],
    "windowsize16-512": ["windowsize 16"],
}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("1k", "blksize+tsize+windowsize16"),
        ("5m", "blksize+tsize+windowsize16"),
        ("40m", "blksize+tsize+windowsize16"),
        ("5m", "lock-step-512"),
        ("40m", "lock-step-512"),  # wraps in lock-step
        ("40m", "windowsize16-512"),  # wraps inside windows
    ],
)
def test_atftp_fetches_bit_exact(
    atftp: str, served: Served, tmp_path: Path, name: str, options: str
) -> None:
    out = tmp_path / name
    argv = [atftp, "--trace", "-g", "-r", name, "-l", str(out)]
    for option in ATFTP_OPTIONS[options]:
        argv += ["--option", option]
    result = _run([*argv, "127.0.0.1", str(served.port)])
    assert result.returncode == 0, result.stderr[-2000:]
    _same(out, served.root / name)
    trace = result.stdout + result.stderr
    if "tsize 0" in ATFTP_OPTIONS[options]:
        oack = next(line for line in trace.splitlines() if "received OACK" in line)
        assert f"tsize: {SIZES[name]}" in oack
        assert "windowsize: 16" in oack and "blksize: 1468" in oack


def test_symlink_inside_the_root_is_served(curl: str, served: Served, tmp_path: Path) -> None:
    out = tmp_path / "inside"
    result = _run([curl, "-sS", "-o", str(out), f"tftp://127.0.0.1:{served.port}/inside"])
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == b"inner\n"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("missing", CURL_NOT_FOUND),
        ("sub/missing", CURL_NOT_FOUND),
        ("../secret", CURL_ACCESS_VIOLATION),
        ("sub/../../secret", CURL_ACCESS_VIOLATION),
        ("/etc/passwd", CURL_ACCESS_VIOLATION),  # tftp://host//etc/passwd asks for /etc/passwd
        ("escape", CURL_ACCESS_VIOLATION),
    ],
)
def test_curl_refusals(curl: str, served: Served, tmp_path: Path, path: str, code: int) -> None:
    out = tmp_path / "out"
    url = f"tftp://127.0.0.1:{served.port}/{path}"
    result = _run([curl, "-sS", "--path-as-is", "-o", str(out), url])
    assert result.returncode == code, result.stderr
    assert not out.exists() or served.secret.read_bytes() not in out.read_bytes()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing", "file not found"),
        ("../secret", "'..' is not allowed in file names"),
        ("/etc/passwd", "absolute paths are not served"),
        (None, "path leads outside the served root"),  # the escaping symlink
    ],
)
def test_atftp_refusals(
    atftp: str, served: Served, tmp_path: Path, path: str | None, message: str
) -> None:
    out = tmp_path / "out"
    remote = path or "escape"
    result = _run([atftp, "-g", "-r", remote, "-l", str(out), "127.0.0.1", str(served.port)])
    assert result.returncode != 0
    assert f"error received from server <{message}>" in result.stderr


def test_atftp_upload_is_refused(atftp: str, served: Served) -> None:
    local = served.root / "1k"
    result = _run([atftp, "-p", "-l", str(local), "-r", "uploaded", "127.0.0.1", str(served.port)])
    assert result.returncode != 0
    assert "error received from server <this server is read-only>" in result.stderr
    assert not (served.root / "uploaded").exists()
