"""Boot artefact throughput over HTTP: ours (aiohttp FileResponse, sendfile) vs nginx
(sendfile on), same file, same client (curl to /dev/null) on loopback; median of 5 each,
interleaved.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import median, table, write_section
from hatchery_lab.netenv import AGENT

RUNS = 9
SIZE_MB = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/nginx-error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    sendfile on;
    tcp_nopush on;
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {listen};
        root {root};
    }}
}}
"""


def nginx_argv(tmp: Path, root: Path, listen: str) -> list[str]:
    """Our own nginx process: a config in ``tmp``, serving ``root`` on ``listen``."""
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, root=root, listen=listen))
    return ["nginx", "-c", str(conf), "-p", str(tmp)]


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def curl_speed(url: str) -> float:
    """Bytes per second as curl measured it."""
    out = subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{speed_download}", url],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    return float(out.stdout)


def run() -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp_text:
        tmp = Path(tmp_text)
        root = tmp / "root"
        (root / "artefacts" / "img").mkdir(parents=True)
        big = root / "artefacts" / "img" / "initrd"
        with big.open("wb") as f:
            for _ in range(SIZE_MB):
                f.write(os.urandom(1 << 20))
        ours_port, nginx_port = free_port(), free_port()
        log = (tmp / "ours.log").open("wb")
        ours = subprocess.Popen([str(AGENT), "serve", "http", "--root", str(root / "artefacts"),
                                 "--listen", f"127.0.0.1:{ours_port}"],
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        nginx = subprocess.Popen(nginx_argv(tmp, root, f"127.0.0.1:{nginx_port}"),
                                 stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        speeds: dict[str, list[float]] = {"ours (aiohttp FileResponse)": [], "nginx": []}
        try:
            wait_port("127.0.0.1", ours_port)
            wait_port("127.0.0.1", nginx_port)
            urls = {
                "ours (aiohttp FileResponse)": f"http://127.0.0.1:{ours_port}/artefacts/img/initrd",
                "nginx": f"http://127.0.0.1:{nginx_port}/artefacts/img/initrd",
            }
            for url in urls.values():  # warm the page cache and both servers
                curl_speed(url)
            for _ in range(RUNS):
                for name, url in urls.items():
                    speeds[name].append(curl_speed(url))
        finally:
            for proc in (ours, nginx):
                proc.terminate()
                proc.wait(timeout=10)
            log.close()
    ours_mb = median(speeds["ours (aiohttp FileResponse)"]) / 1e6
    nginx_mb = median(speeds["nginx"]) / 1e6
    rows = [
        (name, f"{median(s) / 1e6:.0f}", f"{min(s) / 1e6:.0f}", f"{max(s) / 1e6:.0f}")
        for name, s in speeds.items()
    ]
    body = (
        f"A {SIZE_MB} MB artefact (page-cached) fetched with `curl -o /dev/null` over loopback, "
        f"{RUNS} interleaved runs each; both servers use sendfile.\n\n"
        + table(["server", "median MB/s", "min", "max"], rows)
        + f"\n\nRatio ours / nginx: **{ours_mb / nginx_mb:.2f}x** (goal: at least 0.9x)."
    )
    write_section("boot-http", "Boot HTTP: artefact throughput, ours vs nginx", body)
    print(body)


if __name__ == "__main__":
    run()
