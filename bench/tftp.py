"""TFTP throughput on loopback: our server against tftpd-hpa, dnsmasq and atftpd.

One 50 MB file, blksize 1468, the same client against every server, runs interleaved so
machine noise hits all alike. curl is lock-step only (no windowsize option); atftp runs
lock-step and with RFC 7440 windowsize 16 and 64 against atftpd (the one reference server
here that has windowsize). Everything runs inside a network namespace this benchmark creates,
because dnsmasq's TFTP can only listen on port 69. atftpd conflicts with tftpd-hpa as a
Debian package, so its .deb is downloaded and unpacked into .cache/bench/ instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.proc import CpuGroup, cpu_group
from bench.report import PairedRatio, median, paired_ratio, table, write_section

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
SIZE = 50_000_000
BLKSIZE = 1468
RUNS = 11
FILE = "bench.bin"
HOST = "127.0.0.1"
HEADERS = (
    "client",
    "mode",
    "server",
    "median MB/s",
    "range",
    "server CPU s",
    "ours vs this server, run by run (95 % interval)",
)


@dataclass(frozen=True)
class Fetch:
    rate: float  # MB/s of the client's wall time
    server_cpu: float  # seconds of the server's CPU (user + system, its children included)


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    argv: tuple[str, ...]


def _need(tool: str) -> str:
    path = shutil.which(tool) or next(
        (str(p) for p in (Path("/usr/sbin") / tool, Path("/sbin") / tool) if p.exists()), None
    )
    if path is None:
        raise SystemExit(f"bench tftp: {tool} is not installed (make setup installs it)")
    return path


def _atftpd() -> Path:
    """atftpd from Debian's .deb, unpacked (not installed: it conflicts with tftpd-hpa)."""
    unpacked = CACHE / "atftpd" / "root"
    binary = unpacked / "usr" / "sbin" / "atftpd"
    if binary.exists():
        return binary
    download = CACHE / "atftpd"
    download.mkdir(parents=True, exist_ok=True)
    for old in download.glob("atftpd_*.deb"):
        old.unlink()
    subprocess.run(
        ["apt-get", "download", "-o", "APT::Sandbox::User=root", "atftpd"],
        cwd=download,
        check=True,
    )
    deb = next(download.glob("atftpd_*.deb"))
    shutil.rmtree(unpacked, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    return binary


def _payload(root: Path) -> str:
    """The 50 MB file (random bytes, made once) and its SHA-256."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / FILE
    if not path.exists() or path.stat().st_size != SIZE:
        with tempfile.NamedTemporaryFile(dir=root, delete=False) as tmp:
            for _ in range(SIZE // (1 << 20)):
                tmp.write(os.urandom(1 << 20))
            tmp.write(os.urandom(SIZE % (1 << 20)))
        os.replace(tmp.name, path)
    (root / "ready").write_bytes(b"ready\n")
    for p in (root, *root.iterdir()):  # tftpd-hpa and atftpd want world-readable files
        p.chmod(0o755 if p.is_dir() else 0o644)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _namespace() -> Iterator[str]:
    name = f"hatchery-bench-tftp-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        # glibc's AI_ADDRCONFIG disregards 127.0.0.1: with no other IPv4 address tftpd-hpa
        # cannot even resolve the address it is told to bind.
        subprocess.run(
            ["ip", "-n", name, "addr", "add", "10.255.255.1/32", "dev", "lo"], check=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _in(ns: str, argv: list[str] | tuple[str, ...]) -> list[str]:
    # nsenter execs the command in place (same PID to stop) and adds little start-up time.
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


@contextlib.contextmanager
def _running(ns: str, server: Server, logdir: Path, group: CpuGroup) -> Iterator[None]:
    """The server started in ``ns`` and in ``group``, answering."""
    log = (logdir / f"{server.name}.log").open("wb")
    process = subprocess.Popen(
        _in(ns, server.argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=group.join,
    )
    try:
        deadline = time.monotonic() + 15
        url = f"tftp://{HOST}:{server.port}/ready"
        probe = _in(ns, ["curl", "-s", "--max-time", "1", "-o", "/dev/null", url])
        while subprocess.run(probe, check=False).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench tftp: {server.name} did not start; see {log.name}")
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _client(kind: str, window: int, port: int, out: Path) -> list[str]:
    if kind == "curl":
        url = f"tftp://{HOST}:{port}/{FILE}"
        return ["curl", "-sS", "--tftp-blksize", str(BLKSIZE), "-o", str(out), url]
    argv = ["atftp", "-g", "-r", FILE, "-l", str(out), "--option", f"blksize {BLKSIZE}"]
    argv += ["--option", "tsize 0"]
    if window > 1:
        argv += ["--option", f"windowsize {window}"]
    return [*argv, HOST, str(port)]


def _fetch(ns: str, argv: list[str], out: Path, digest: str, server: CpuGroup) -> Fetch:
    """One fetch, checked bit-exact: the client's rate and the CPU the server spent on it."""
    out.unlink(missing_ok=True)
    cpu = server.cpu_seconds()
    start = time.perf_counter()
    try:
        result = subprocess.run(_in(ns, argv), capture_output=True, check=False, timeout=300)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench tftp: {' '.join(argv)} timed out") from None
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or not out.exists() or out.stat().st_size != SIZE:
        raise SystemExit(f"bench tftp: {' '.join(argv)} failed: {result.stderr.decode()}")
    if hashlib.sha256(out.read_bytes()).hexdigest() != digest:
        raise SystemExit(f"bench tftp: {' '.join(argv)} fetched different bytes")
    time.sleep(0.05)  # a forking server's (tftpd-hpa's) child ends after the last ACK
    return Fetch(SIZE / elapsed / 1e6, server.cpu_seconds() - cpu)


def run() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench tftp: needs root (a network namespace for dnsmasq's port 69)")
    for tool in ("curl", "atftp", "in.tftpd", "dnsmasq", "nsenter", "ip", "dpkg-deb"):
        _need(tool)
    root = CACHE / "tftp" / "root"
    digest = _payload(root)
    atftpd = _atftpd()
    agent = Path(sys.executable).parent / "hatchery-agent"
    ours_argv = (str(agent),) if agent.exists() else (sys.executable, "-m", "hatchery.agent_main")
    servers = {
        "ours": Server(
            "ours",
            6969,
            (*ours_argv, "serve", "tftp", "--root", str(root), "--listen", f"{HOST}:6969"),
        ),
        "tftpd-hpa": Server(
            "tftpd-hpa",
            6970,
            (_need("in.tftpd"), "-L", "-u", "root", "-s", "-a", f"{HOST}:6970", str(root)),
        ),
        "dnsmasq": Server(
            "dnsmasq",
            69,
            (
                _need("dnsmasq"),
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--enable-tftp",
                f"--tftp-root={root}",
                f"--listen-address={HOST}",
                "--user=root",
                "--group=root",
                "--pid-file=",
                "--log-facility=-",
                "--quiet-tftp",
            ),
        ),  # fmt: skip
        "atftpd": Server(
            "atftpd",
            6971,
            (
                str(atftpd),
                "--daemon",
                "--no-fork",
                "--port",
                "6971",
                "--bind-address",
                HOST,
                "--user",
                "root",
                "--group",
                "root",
                "--logfile",
                "/dev/null",
                str(root),
            ),
        ),  # fmt: skip
    }
    # (client, windowsize) -> servers compared; ours first.
    cases = {
        ("curl", 1): ("ours", "tftpd-hpa", "dnsmasq"),
        ("atftp", 1): ("ours", "atftpd"),
        ("atftp", 16): ("ours", "atftpd"),
        ("atftp", 64): ("ours", "atftpd"),
    }
    fetches: dict[tuple[str, int, str], list[Fetch]] = {
        (client, window, name): [] for (client, window), names in cases.items() for name in names
    }
    load = os.getloadavg()[0]
    scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else CACHE
    with (
        tempfile.TemporaryDirectory(dir=scratch, prefix="hatchery-bench-tftp-") as tmp,
        _namespace() as ns,
        contextlib.ExitStack() as stack,
    ):
        out = Path(tmp) / "out.bin"
        groups = {name: stack.enter_context(cpu_group(f"tftp-{name}")) for name in servers}
        for name, server in servers.items():
            stack.enter_context(_running(ns, server, Path(tmp), groups[name]))
        for run in range(RUNS):
            for (client, window), names in cases.items():
                for name in names[run % len(names) :] + names[: run % len(names)]:  # rotate
                    argv = _client(client, window, servers[name].port, out)
                    fetch = _fetch(ns, argv, out, digest, groups[name])
                    fetches[(client, window, name)].append(fetch)
    body = _report(cases, fetches, load)
    write_section("tftp", "TFTP throughput: ours vs tftpd-hpa, dnsmasq, atftpd", body)
    print(body)


def _report(
    cases: dict[tuple[str, int], tuple[str, ...]],
    fetches: dict[tuple[str, int, str], list[Fetch]],
    load: float,
) -> str:
    def against(client: str, window: int, name: str) -> PairedRatio:
        """Ours against ``name``, run by run (each run fetches from every server in turn)."""
        rates = {n: [f.rate for f in fetches[(client, window, n)]] for n in ("ours", name)}
        return paired_ratio(rates["ours"], rates[name])

    rows = []
    for (client, window), names in cases.items():
        mode = "lock-step" if window == 1 else f"windowsize {window}"
        for name in names:
            rates = [f.rate for f in fetches[(client, window, name)]]
            mid = median(rates)
            cpu = median([f.server_cpu for f in fetches[(client, window, name)]])
            pair = None if name == "ours" else against(client, window, name)
            ratio = "" if pair is None else f"{pair.median:.2f}x ({pair.low:.2f}–{pair.high:.2f})"
            rows.append((client, mode, name, f"{mid:.1f}", f"{min(rates):.1f}–{max(rates):.1f}",
                         f"{cpu:.2f}", ratio))  # fmt: skip
    lock = against("curl", 1, "tftpd-hpa")
    w16, w64 = (against("atftp", w, "atftpd") for w in (16, 64))
    return (
        f"A {SIZE // 1_000_000} MB file over loopback inside a network namespace, blksize "
        f"{BLKSIZE}, tsize requested; MB/s of the client's wall time (start to exit, every "
        f"fetch checked bit-exact), median of {RUNS} interleaved runs; load average "
        f"{load:.1f} at the start. Server CPU: the server's user + system seconds for one "
        f"fetch, median (each server in a cgroup of its own, so tftpd-hpa's child per "
        f"transfer counts). Ratios are taken run by run (ours against the fetch from the "
        f"other server in the same run), with a 95 % interval of their median: one that "
        f"holds 1.0 is parity as far as the run can tell. Goals (issue 19): lock-step at "
        f"least 1.0x tftpd-hpa (here {lock}), windowsize 16 and 64 at least 1.0x atftpd "
        f"(here {w16} and {w64}).\n\n" + table(HEADERS, rows)
    )
