"""A simulated fleet for tests and benchmarks: one process, many agent endpoints.

``python -m hatchery_rollout.simfleet CONFIG.json`` binds one loopback port per simulated host
and serves the real health and upgrade API of docs/api.md on each, over mutual TLS (the
certificates come from ``hatchery.pki``). Upgrades take ``upgrade_delay`` seconds; failures
are injected per host. When ready it writes ``fleet`` (an inventory for ``hatchery-rollout``)
and ``ready`` (JSON: ports and the admin port), each atomically.

The admin endpoint (plain HTTP on loopback) serves ``GET /stats``: per host the number of
upgrade requests, of upgrades actually started, the first request's time, the time its
health was first reported failing, its version, and its requests and the client
connections they came over; ``GET /connections`` the client connections open now; ``POST
/config`` changes the injected failures at run time (to "repair" a host).

Config keys: ``hosts`` (count), ``ca``, ``cert``, ``key``, ``version`` (running at start),
``upgrade_delay``, ``racks`` (hosts per rack), ``fail_health``, ``baseline_fail``,
``fail_upgrade``, ``fallback``, ``already`` (names), ``vms`` (name -> count), ``fleet``,
``ready`` (paths); for the preflight: ``target`` (the version every store holds, default
``v2``), ``image_size`` (bytes), ``missing_image`` (names whose store lacks ``target``; a
``POST /v1/images/fetch`` adds it), ``free_bytes`` (each host's /data, default 100 GiB) and
``low_space`` (names with 1 MiB free). For the VM report of a reboot-mode upgrade: each VM
(``vms``) is reported resumed after ``vm_pause`` seconds (default 1.5), except on the hosts
named in ``cold_start``, whose first VM (one even if ``vms`` gives none) reports cold-started;
``restore_delay`` (seconds, default 0) is how long after its upgrade a host still reports
its VMs ``restoring``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from hatchery.pki import identity_from_peercert, server_context
from hatchery.wire import BootStatus, Health, Mode, Phase, UpgradeStatus, VmOutcome, VmResult

COLD_REASON = "resume failed: injected: its state file is missing; cold-started"


@dataclass(slots=True)
class SimHost:
    name: str
    version: str
    vms: int = 0
    state: Phase = Phase.IDLE
    target: str | None = None
    mode: Mode | None = None
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    posts: int = 0
    upgrades: int = 0
    first_post: float | None = None
    first_unhealthy: float | None = None
    fallback: bool = False
    images: set[str] = field(default_factory=set)
    free_bytes: int = 100 << 30
    fetches: int = 0
    requests: int = 0
    connections: int = 0  # client connections its requests came over
    last_peer: object = None  # the client address of the latest one


@dataclass(slots=True)
class Sim:
    delay: float
    image_size: int = 100 << 20
    hosts: dict[int, SimHost] = field(default_factory=dict)  # by local port
    fail_health: set[str] = field(default_factory=set)
    baseline_fail: set[str] = field(default_factory=set)
    fail_upgrade: set[str] = field(default_factory=set)
    fallback: set[str] = field(default_factory=set)
    cold_start: set[str] = field(default_factory=set)
    vm_pause: float = 1.5
    restore_delay: float = 0.0

    def settle(self, h: SimHost) -> None:
        """Finish an upgrade whose time has come (lazily: no task per host)."""
        now = time.time()
        if h.state is Phase.RUNNING and h.started is not None and now >= h.started + self.delay:
            h.finished = now
            if h.name in self.fail_upgrade:
                h.state, h.error = Phase.FAILED, "injected upgrade failure"
            elif h.name in self.fallback:
                h.state, h.fallback = Phase.DONE, True
            else:
                h.state, h.version = Phase.DONE, h.target or h.version

    def upgrade_doc(self, h: SimHost) -> dict[str, Any]:
        return self.upgrade_status(h).to_json()

    def upgrade_status(self, h: SimHost) -> UpgradeStatus:
        return UpgradeStatus(h.state, h.target, h.mode, h.error, h.started, h.finished,
                             vms=self.vm_report(h))  # fmt: skip

    def vm_report(self, h: SimHost) -> tuple[VmOutcome, ...]:
        """After a reboot-mode upgrade, what became of each VM (see the module's doc)."""
        if h.mode is not Mode.REBOOT or h.state is not Phase.DONE or h.finished is None:
            return ()
        count = max(h.vms, 1) if h.name in self.cold_start else h.vms
        names = [f"vm{i}" for i in range(count)]
        if time.time() < h.finished + self.restore_delay:
            return tuple(VmOutcome(n, VmResult.RESTORING) for n in names)
        return tuple(
            VmOutcome(n, VmResult.COLD_STARTED, reason=COLD_REASON)
            if i == 0 and h.name in self.cold_start
            else VmOutcome(n, VmResult.RESUMED, pause_seconds=self.vm_pause + i / 10)
            for i, n in enumerate(names)
        )

    def health_doc(self, h: SimHost) -> dict[str, Any]:
        checks = {"agent": "ok", "units": "ok", "vms": "ok"}
        if h.name in self.baseline_fail:
            checks["vms"] = "fail: vm web1 crashed (before the upgrade)"
        upgraded = h.state is Phase.DONE and h.target == h.version
        if h.name in self.fail_health and upgraded:
            checks["units"] = "fail: injected: hatchery-dhcp.service failed"
        healthy = all(v == "ok" for v in checks.values())
        if not healthy and upgraded and h.first_unhealthy is None:
            h.first_unhealthy = time.time()
        reason = "new version did not mark itself good" if h.fallback else None
        return Health(
            version=h.version,
            healthy=healthy,
            checks=checks,
            vms={"total": h.vms, "running": h.vms, "stopped": 0, "crashed": 0},
            upgrade=self.upgrade_status(h),
            boot=BootStatus(h.fallback, reason),
            free_bytes=h.free_bytes,
        ).to_json()


SIM = web.AppKey("sim", Sim)
SERVER = web.AppKey("server", web.Server)


def _host(request: web.Request) -> SimHost:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    host = request.app[SIM].hosts.get(sockname[1] if sockname else -1)
    if host is None:
        raise web.HTTPNotFound()
    request.app[SIM].settle(host)
    host.requests += 1
    # A host's requests follow each other, so a new client address is a new connection.
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if peer != host.last_peer:
        host.connections += 1
        host.last_peer = peer
    return host


def _error(status: int, message: str, field_name: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field_name:
        body["field"] = field_name
    return web.json_response(body, status=status)


async def healthz(request: web.Request) -> web.Response:
    h = _host(request)
    if h.state is Phase.RUNNING and h.mode is Mode.REBOOT:
        return _error(503, "rebooting")
    return web.json_response(request.app[SIM].health_doc(h))


async def get_upgrade(request: web.Request) -> web.Response:
    h = _host(request)
    sim = request.app[SIM]
    try:
        wait = min(float(request.query.get("wait", "0")), 60.0)
    except ValueError:
        return _error(400, "wait: seconds expected", "wait")
    if wait > 0 and h.state is Phase.RUNNING and h.started is not None:
        await asyncio.sleep(max(0.0, min(wait, h.started + sim.delay - time.time())))
        sim.settle(h)
    return web.json_response(sim.upgrade_doc(h))


async def post_upgrade(request: web.Request) -> web.Response:
    h = _host(request)
    sim = request.app[SIM]
    ident = identity_from_peercert(request.transport.get_extra_info("peercert"))  # type: ignore[union-attr]
    if ident is None or "admin" not in ident.groups:
        return _error(403, "the admin group is required")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "body is not JSON")
    version = body.get("version") if isinstance(body, dict) else None
    mode_text = body.get("mode", "live") if isinstance(body, dict) else None
    if not isinstance(version, str) or not version:
        return _error(400, "version: required", "version")
    if mode_text not in (Mode.LIVE, Mode.REBOOT):
        return _error(400, "mode: live or reboot", "mode")
    mode = Mode(mode_text)
    h.posts += 1
    if h.first_post is None:
        h.first_post = time.time()
    if h.state is Phase.RUNNING:
        if h.target == version:
            return web.json_response(sim.upgrade_doc(h), status=202)
        return _error(409, f"an upgrade to {h.target} is running")
    if h.version == version:
        done = UpgradeStatus(Phase.DONE, target=version, mode=mode)
        return web.json_response(done.to_json(), status=200)
    h.state, h.target, h.mode, h.error = Phase.RUNNING, version, mode, None
    h.started, h.finished = time.time(), None
    h.upgrades += 1
    return web.json_response(sim.upgrade_doc(h), status=202)


async def list_images(request: web.Request) -> web.Response:
    h = _host(request)
    size = request.app[SIM].image_size
    return web.json_response(
        {"images": [{"version": v, "size": size} for v in sorted(h.images)], "current": h.version}
    )


async def fetch_image(request: web.Request) -> web.Response:
    h = _host(request)
    body = await request.json()
    version = body.get("version") if isinstance(body, dict) else None
    if not isinstance(version, str) or not isinstance(body.get("peer"), str):
        return _error(400, "peer and version required")
    h.fetches += 1
    h.images.add(version)
    return web.json_response({"version": version, "added": 1}, status=201)


async def stats(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    out = {}
    for port, h in sim.hosts.items():
        sim.settle(h)
        out[h.name] = {
            "port": port,
            "posts": h.posts,
            "upgrades": h.upgrades,
            "first_post": h.first_post,
            "first_unhealthy": h.first_unhealthy,
            "version": h.version,
            "state": h.state,
            "fetches": h.fetches,
            "requests": h.requests,
            "connections": h.connections,
        }
    return web.json_response(out)


async def connections(request: web.Request) -> web.Response:
    """How many client connections the simulated agents hold open right now."""
    return web.json_response({"open": len(request.app[SERVER].connections)})


async def configure(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await request.json()
    for key in ("fail_health", "baseline_fail", "fail_upgrade", "fallback", "cold_start"):
        if key in body:
            setattr(sim, key, set(body[key]))
    return web.json_response({"ok": True})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def serve(config: dict[str, Any]) -> None:
    count = int(config["hosts"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, count + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    width = max(5, len(str(count)))
    sim = Sim(delay=float(config.get("upgrade_delay", 0.02)),
              image_size=int(config.get("image_size", 100 << 20)))  # fmt: skip
    missing = set(config.get("missing_image", ()))
    low = set(config.get("low_space", ()))
    free = int(config.get("free_bytes", 100 << 30))
    for key in ("fail_health", "baseline_fail", "fail_upgrade", "fallback", "cold_start"):
        setattr(sim, key, set(config.get(key, ())))
    sim.vm_pause = float(config.get("vm_pause", 1.5))
    sim.restore_delay = float(config.get("restore_delay", 0.0))
    already = set(config.get("already", ()))
    vms = config.get("vms", {})
    target = str(config.get("target", "v2"))
    version = str(config.get("version", "v1"))
    ctx = server_context(Path(config["ca"]), Path(config["cert"]), Path(config["key"]))

    app = web.Application()
    app[SIM] = sim
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/upgrade", get_upgrade)
    app.router.add_post("/v1/upgrade", post_upgrade)
    app.router.add_get("/v1/images", list_images)
    app.router.add_post("/v1/images/fetch", fetch_image)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    admin_app = web.Application()
    admin_app[SIM] = sim
    admin_app.router.add_get("/stats", stats)
    admin_app.router.add_post("/config", configure)
    admin_app.router.add_get("/connections", connections)
    if runner.server is None:
        raise RuntimeError("the agents' runner has no server after its setup")
    admin_app[SERVER] = runner.server
    admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
    await admin_runner.setup()

    racks = int(config.get("racks", 10))
    lines = ["levels: [region, building, rack]", "hosts:"]
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        name = f"host{i:0{width}d}"
        sim.hosts[port] = SimHost(
            name, target if name in already else version, vms=int(vms.get(name, 0)),
            images={version} if name in missing else {version, target},
            free_bytes=1 << 20 if name in low else free,
        )  # fmt: skip
        await web.SockSite(runner, sock, ssl_context=ctx, backlog=512).start()
        lines.append(
            f"  - {{name: {name}, address: '127.0.0.1:{port}', location: sim/b1/r{i // racks}}}"
        )
    admin_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    admin_sock.bind(("127.0.0.1", 0))
    await web.SockSite(admin_runner, admin_sock).start()
    _write_atomic(Path(config["fleet"]), "\n".join(lines) + "\n")
    ready = {
        "pid": os.getpid(),
        "admin": admin_sock.getsockname()[1],
        "ports": {h.name: p for p, h in sim.hosts.items()},
    }
    _write_atomic(Path(config["ready"]), json.dumps(ready))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await admin_runner.cleanup()
    await runner.cleanup()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m hatchery_rollout.simfleet CONFIG.json", file=sys.stderr)
        return 2
    asyncio.run(serve(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
