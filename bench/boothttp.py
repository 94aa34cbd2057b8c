"""Boot artefact throughput over HTTP: ours (the boot HTTP service's sendfile pump) vs nginx
(sendfile on), same file, same client (curl to /dev/null) on loopback, interleaved: one
stream (median of the runs), and 50 streams at once (aggregate: bytes over the time until
the last one finished).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.proc import cpu_group
from bench.report import median, paired_ratio, table, write_section
from hatchery_lab.netenv import AGENT

# One stream lasts ~0.4 s and moves ±5-10 % run to run on a shared machine: 9 runs gave
# medians from 0.93x to 1.08x nginx's on the same code. The ratio is taken pair by pair
# (``paired_ratio``), with the interval that says what the run resolved.
RUNS = 40
SIZE_MB = 1024
STREAMS = 50  # concurrent clients for the aggregate figure
STREAM_MB = 150  # each fetches a root-image-sized file
AGGREGATE_RUNS = 5
OURS = "ours (sendfile pump)"


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


def aggregate(url: str) -> float:
    """Bytes per second over ``STREAMS`` curls started at once, until the last one ended."""
    argv = ["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{size_download}", url]
    start = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(STREAMS)]
    sizes = [int(p.communicate(timeout=300)[0] or 0) for p in procs]
    elapsed = time.perf_counter() - start
    if any(p.returncode != 0 for p in procs) or set(sizes) != {STREAM_MB << 20}:
        raise SystemExit(f"bench boot-http: a stream of {url} failed: {sizes}")
    return sum(sizes) / elapsed


def run() -> None:
    # The CPU groups are removed last, after their servers have ended (the finally below).
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp_text, contextlib.ExitStack() as stack:
        tmp = Path(tmp_text)
        root = tmp / "root"
        (root / "artefacts" / "img").mkdir(parents=True)
        big = root / "artefacts" / "img" / "initrd"
        with big.open("wb") as f:
            for _ in range(SIZE_MB):
                f.write(os.urandom(1 << 20))
        with (big.parent / "root").open("wb") as f:
            for _ in range(STREAM_MB):
                f.write(os.urandom(1 << 20))
        ours_port, nginx_port = free_port(), free_port()
        log = (tmp / "ours.log").open("wb")
        groups = {name: stack.enter_context(cpu_group(f"boot-http-{i}"))
                  for i, name in enumerate((OURS, "nginx"))}  # fmt: skip
        ours = subprocess.Popen([str(AGENT), "serve", "http", "--root", str(root / "artefacts"),
                                 "--listen", f"127.0.0.1:{ours_port}"],
                                stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=groups[OURS].join)  # fmt: skip
        nginx = subprocess.Popen(nginx_argv(tmp, root, f"127.0.0.1:{nginx_port}"),
                                 stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=groups["nginx"].join)  # fmt: skip
        speeds: dict[str, list[float]] = {OURS: [], "nginx": []}
        cpu: dict[str, list[float]] = {OURS: [], "nginx": []}  # server seconds per stream
        many: dict[str, list[float]] = {OURS: [], "nginx": []}
        try:
            wait_port("127.0.0.1", ours_port)
            wait_port("127.0.0.1", nginx_port)
            urls = {
                OURS: f"http://127.0.0.1:{ours_port}/artefacts/img/initrd",
                "nginx": f"http://127.0.0.1:{nginx_port}/artefacts/img/initrd",
            }
            for url in urls.values():  # warm the page cache and both servers
                curl_speed(url)
            for i in range(RUNS):  # the order alternates: neither server always goes first
                for name, url in list(urls.items())[:: 1 if i % 2 == 0 else -1]:
                    before = groups[name].cpu_seconds()
                    speeds[name].append(curl_speed(url))
                    cpu[name].append(groups[name].cpu_seconds() - before)
            for i in range(AGGREGATE_RUNS):
                for name, url in list(urls.items())[:: 1 if i % 2 == 0 else -1]:
                    many[name].append(aggregate(url.replace("/initrd", "/root")))
        finally:
            for proc in (ours, nginx):
                proc.terminate()
                proc.wait(timeout=10)
            log.close()
    load = os.getloadavg()
    one = paired_ratio(speeds[OURS], speeds["nginx"])
    both = paired_ratio(many[OURS], many["nginx"])
    rows = [
        (name, f"{median(s) / 1e6:.0f}", f"{min(s) / 1e6:.0f}", f"{max(s) / 1e6:.0f}",
         f"{median(cpu[name]):.2f}", f"{median(many[name]) / 1e6:.0f}")
        for name, s in speeds.items()
    ]  # fmt: skip
    header = ["server", "1 stream median MB/s", "min", "max", "server CPU s per stream",
              f"{STREAMS} streams MB/s"]  # fmt: skip
    body = (
        f"One stream: a {SIZE_MB} MiB artefact (page-cached) fetched with `curl -o /dev/null` "
        f"over loopback, {RUNS} interleaved runs each (which server goes first alternates). "
        f"{STREAMS} streams: {STREAMS} curls "
        f"started at once, each fetching a {STREAM_MB} MiB artefact, aggregate = all bytes over "
        f"the time until the last finished, median of {AGGREGATE_RUNS} interleaved runs. Both "
        f"servers use sendfile; nginx has one worker. Server CPU: its user + system seconds "
        f"for one stream (median; each server in a cgroup of its own): over loopback the "
        f"sender's CPU also runs the kernel's receive path, so this is what bounds one "
        f"stream. Load average at the end "
        f"{'/'.join(f'{x:.2f}' for x in load)} (2 shared cores: the curls compete with the "
        f"servers for CPU).\n\n"
        + table(header, rows)
        + f"\n\nRatio ours / nginx, pair by pair (each run of ours against the run of nginx "
        f"next to it, so the machine's drifting load cancels): one stream **{one}** (goal: "
        f"at least 1.0x), {STREAMS} streams **{both}** (goal: at least 0.95x). An interval "
        f"that holds 1.0 is parity as far as this run can tell."
    )
    write_section("boot-http", "Boot HTTP: artefact throughput, ours vs nginx", body)
    print(body)


if __name__ == "__main__":
    run()
