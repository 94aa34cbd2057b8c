"""curl, a client we did not write, against ``hatchery-agent serve http`` on loopback."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery_lab import REPO
from hatchery_lab.netenv import AGENT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "artefacts"
    (root / "hypervisor" / "current").mkdir(parents=True)
    (root / "hypervisor" / "current" / "initrd").write_bytes(os.urandom(5 << 20))
    (tmp_path / "secret").write_text("outside the root")
    port = _free_port()
    log = (tmp_path / "http.log").open("wb")
    proc = subprocess.Popen([str(AGENT), "serve", "http", "--root", str(root), "--listen",
                             f"127.0.0.1:{port}", "--profiles", str(REPO / "pxe/profiles.yaml")],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while b"boot http: serving" not in (tmp_path / "http.log").read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "http.log"
            ).read_text()
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", root
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def curl(require: Callable[[str], str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([require("curl"), "-sS", *args], capture_output=True, timeout=60,
                          check=False)  # fmt: skip


def test_curl_fetches_artefact_whole_and_by_range(server, require_tool) -> None:
    url, root = server
    data = (root / "hypervisor/current/initrd").read_bytes()
    whole = curl(require_tool, "-f", f"{url}/artefacts/hypervisor/current/initrd")
    assert hashlib.sha256(whole.stdout).digest() == hashlib.sha256(data).digest()
    part = curl(require_tool, "-f", "-r", "1000-1999", f"{url}/artefacts/hypervisor/current/initrd")
    assert part.stdout == data[1000:2000]
    # resume from an offset, as a client does after a dropped connection
    tail = curl(
        require_tool, "-f", "-C", str(len(data) - 10), f"{url}/artefacts/hypervisor/current/initrd"
    )
    assert tail.stdout == data[-10:]


def test_curl_cannot_leave_the_root(server, require_tool) -> None:
    url, _ = server
    for path in ("/artefacts/../secret", "/artefacts/%2e%2e/secret", "/artefacts/..%2fsecret"):
        out = curl(
            require_tool, "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", url + path
        )
        assert out.stdout.decode() in ("403", "404"), path


def test_curl_gets_the_script_and_a_clear_refusal(server, require_tool) -> None:
    url, _ = server
    script = curl(require_tool, "-f", f"{url}/boot/ipxe?mac=52:54:00:12:34:56")
    assert script.stdout.startswith(b"#!ipxe")
    bad = curl(require_tool, "-w", "\n%{http_code}", f"{url}/boot/ipxe?mac=nope")
    assert bad.stdout.endswith(b"400") and b"no valid ?mac=" in bad.stdout
