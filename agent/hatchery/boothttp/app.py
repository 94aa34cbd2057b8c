"""The boot HTTP service (aiohttp).

- ``GET /boot/ipxe?mac=MAC``: the iPXE script of that machine's profile (pxe/profiles.yaml);
  an unknown MAC gets the default profile, or 404 with a reason when there is none. With the
  DHCP server's birth leases (``births``), only the address holding MAC's birth lease gets
  it; with a seed folder too, the script carries ``hatchery.seed=BASE/seed/TOKEN``, a birth
  token minted for that MAC and address (``tokens.py``).
- ``POST /seed/TOKEN`` with a 32-byte X25519 public key: the machine's seed (it holds its
  private key), sealed to that key (``hatchery.sealing``), once, to the address the token
  was minted for while that address still holds the machine's birth lease; the token is then
  burnt. Anything else — an unknown, reused or expired token, another address — is the same
  404 with the same body; a body that is not a key is a 400 and burns nothing.
- ``GET /boot/uki.efi?mac=MAC``: the same machine's boot as one EFI executable, a unified
  kernel image (systemd's EFI stub, the profile's command line with the seed URL, its kernel
  and initrd; ``uki.py``), streamed from the artefact files, never built whole. It is what
  UEFI HTTP Boot clients are sent to over HTTPS (``boot.https``): firmware that pins the
  boot CA then runs only a kernel, initrd and command line this node served.
  ``&arch=arm64``: the arm64 boot (systemd's arm64 stub and the profile's ``arm64:``
  artefacts), for arm64 UEFI HTTP Boot clients (DHCP client architecture 19); a profile
  without arm64 artefacts is a 404 that says so.
- ``GET /artefacts/PATH``: kernels and initrds under the artefact root (public: signed
  images); ``GET /ipxe/NAME``: the iPXE binaries (for UEFI HTTP Boot clients). Both are
  ``FileResponse``s: range requests and conditional GETs as aiohttp answers them. Artefacts'
  bodies go out through the sendfile pump (``pump.py``), a thread of their own, so a rack
  pulling its images at once neither slows the event loop (the API, DHCP) nor is slowed by it.

Artefact paths go through the path jail shared with TFTP (``hatchery.jail``): no absolute
names, no ``..``, the resolved file must lie inside the root, and the file is served from
the descriptor the jail checked, not re-opened by name. Every refusal is a 404 that says no
more than "not found". Seeds are never under the artefact root.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import mimetypes
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from hatchery import jail
from hatchery.boothttp.profiles import ARCHES, X86_64, Artefacts, Profile, Profiles
from hatchery.boothttp.pump import SendfilePump
from hatchery.boothttp.seeds import SeedFolder
from hatchery.boothttp.tokens import DEFAULT_TTL, TOKEN_BYTES, BirthTokens, Grant
from hatchery.boothttp.uki import UkiError, UkiLayout, layout, machine
from hatchery.config import DEFAULT_UKI_STUB, DEFAULT_UKI_STUB_ARM64, ConnectionLimits
from hatchery.dhcp.leases import normalise_mac
from hatchery.errors import HatcheryError
from hatchery.listener import HttpListener, ListenerError, ListenerStats, count_sent
from hatchery.metrics import HttpMeter
from hatchery.sealing import KEY_SIZE, SealError, public_key, seal

log = logging.getLogger(__name__)

_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
DEFAULT_IPXE_DIR = Path("/usr/lib/ipxe")
UKI_CHUNK = 1 << 20
# Loaded once at import: the first lookup in the global table reads /etc/mime.types (ms),
# and a request must not wait for it (busybox nc half-closes right after its request, and
# aiohttp drops the connection when that FIN is read before the answer is written).
_TYPES = mimetypes.MimeTypes()


class BootHttpError(HatcheryError):
    """The boot HTTP service cannot start."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BirthAddresses(Protocol):
    """What the boot HTTP service needs from the DHCP servers' birth leases."""

    def birth_address(self, mac: str, version: int) -> IPAddress | None:
        """The IPv``version`` address holding ``mac``'s unexpired birth lease now, or None
        (DHCPv4 and DHCPv6 lease separately: a machine may hold one of each)."""
        ...


@dataclass(frozen=True, slots=True)
class BootHttpConfig:
    """``births`` None: scripts for anyone who asks, and no seeds (the service alone, as
    ``serve http`` runs it). With ``births``, a script goes only to the holder of its MAC's
    birth lease; with ``seeds`` too, it names a single-use seed URL when MAC has a seed."""

    root: Path  # artefact root: <root>/<image>/vmlinuz, <root>/<image>/initrd
    profiles: Profiles | None = None  # None: no scripts (every MAC refused)
    ipxe_dir: Path | None = DEFAULT_IPXE_DIR
    public_url: str | None = None  # base URL written into scripts; default: from Host
    births: BirthAddresses | None = None
    seeds: SeedFolder | None = None
    seed_ttl: float = DEFAULT_TTL  # seconds a birth token lives
    uki_stub: Path | None = DEFAULT_UKI_STUB  # None or missing: no /boot/uki.efi
    uki_stub_arm64: Path | None = DEFAULT_UKI_STUB_ARM64  # None or missing: no arm64 UKI

    def stub(self, arch: str) -> Path | None:
        """systemd's EFI stub for ``arch`` (``x86-64``, ``arm64``)."""
        return self.uki_stub if arch == X86_64 else self.uki_stub_arm64

    def __post_init__(self) -> None:
        if self.seeds is not None and self.births is None:
            # Without the lease table nothing binds a token to the machine that boots.
            raise BootHttpError("seeds are handed out only with the DHCP birth leases")


@dataclass(slots=True)
class _Ports:
    """The service's plain-HTTP port, known once it listens (port 0 picks one)."""

    plain: int | None = None


CONFIG = web.AppKey("config", BootHttpConfig)
PORTS = web.AppKey("ports", _Ports)
TOKENS = web.AppKey("tokens", BirthTokens)
PUMP = web.AppKey("pump", SendfilePump)
PUMP_FROM = 256 * 1024  # bytes: smaller bodies are sent on the loop, as aiohttp does
NO_STORE = {"Cache-Control": "no-store"}


def _client_ip(request: web.Request) -> IPAddress | None:
    """The peer's address from the socket itself: IPv4 (an IPv4-mapped IPv6 peer too) or
    IPv6 (a link-local one without its zone: birth leases are global or unique-local)."""
    try:
        addr = ipaddress.ip_address((request.remote or "").split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _base_url(request: web.Request, config: BootHttpConfig) -> str:
    if config.public_url:
        return config.public_url.rstrip("/")
    host = request.host
    if not _HOST.match(host):  # never echo a strange Host header into a script
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        host = f"{sockname[0]}:{sockname[1]}" if sockname else "localhost"
    return f"{'https' if request.secure else 'http'}://{host}"


@dataclass(frozen=True, slots=True)
class _Machine:
    """Who asks for a boot (a checked MAC at its checked address) and what it boots."""

    mac: str
    client: IPAddress | None
    profile: Profile
    base: str  # this service's URL as the machine reached it


def _machine(request: web.Request) -> _Machine | web.Response:
    """The asking machine and its profile, or the refusal to send (a script and a UKI go
    only to the holder of the MAC's birth lease when there is a lease table)."""
    config = request.app[CONFIG]
    raw = request.query.get("mac", "")
    try:
        mac = normalise_mac(raw)
    except ValueError:
        return web.Response(status=400, text=f"no valid ?mac= given: {raw[:40]!r}\n")
    client = _client_ip(request)
    births = config.births
    if births is not None and (
        client is None or births.birth_address(mac, client.version) != client
    ):
        # The script may name a seed token: it goes to the machine that holds the birth
        # lease of MAC (our DHCP gave it that address), to no one else who knows the MAC.
        log.info("boot script for %s refused to %s: not the holder of its birth lease", mac,
                 request.remote)  # fmt: skip
        return web.Response(
            status=404, text=f"no boot script for {mac} at this address (no birth lease)\n"
        )
    profile = config.profiles.for_mac(mac) if config.profiles is not None else None
    if profile is None:
        log.info("boot script refused for %s: no profile and no default", mac)
        return web.Response(
            status=404, text=f"no boot profile for {mac} and no default profile configured\n"
        )
    return _Machine(mac, client, profile, _base_url(request, config))


async def _seed_url(request: web.Request, machine: _Machine, *, mint: bool = True) -> str | None:
    """A single-use seed URL for the machine, when it has a seed; ``mint=False`` (a HEAD):
    a stand-in of the same length, so the answer's size is the GET's and no token is spent."""
    config = request.app[CONFIG]
    if config.seeds is None or machine.client is None:
        return None
    if await asyncio.to_thread(config.seeds.path, machine.mac) is None:
        return None
    token = (
        request.app[TOKENS].mint(machine.mac, machine.client, time.monotonic())
        if mint
        else "x" * len(base64.urlsafe_b64encode(bytes(TOKEN_BYTES)).rstrip(b"="))
    )
    return f"{_plain_base(request, machine.base)}/seed/{token}"


def _plain_base(request: web.Request, base: str) -> str:
    """The plain-HTTP URL of this service for seed fetches: a seed is sealed to the
    machine's own key, and the node's seed fetcher trusts no boot CA, so a UKI fetched over
    HTTPS still names the seed on the plain port (the same address the machine reached)."""
    plain = request.app[PORTS].plain
    if not request.secure or plain is None:
        return base.rstrip("/")
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return base.rstrip("/")
    host = str(sockname[0])
    return f"http://[{host}]:{plain}" if ":" in host else f"http://{host}:{plain}"


async def boot_script(request: web.Request) -> web.StreamResponse:
    machine = _machine(request)
    if isinstance(machine, web.Response):
        return machine
    profile = machine.profile
    seed_url = await _seed_url(request, machine)
    log.info("boot script for %s: profile %s (image %s), to %s%s", machine.mac, profile.name,
             profile.image, machine.client, ", with a seed token" if seed_url else "")  # fmt: skip
    return web.Response(
        text=profile.render(machine.mac, machine.base, seed_url),
        content_type="text/plain",
        headers=NO_STORE,
    )


def _open_uki_parts(
    config: BootHttpConfig, own: Artefacts, arch: str
) -> tuple[bytes, jail.OpenedFile, jail.OpenedFile]:
    """The stub's bytes and the kernel and initrd of ``arch``, opened through the jail; an
    arm64 kernel checked to be an EFI executable for arm64 (not a compressed vmlinuz)."""
    path = config.stub(arch)
    if path is None:
        raise UkiError(f"this service makes no {arch} unified kernel images")
    try:
        stub = path.read_bytes()
    except OSError as exc:
        raise UkiError(f"no {arch} EFI stub at {path} (package systemd-boot-efi for {arch}): "
                       f"{exc.strerror}") from exc  # fmt: skip
    kernel = jail.open_in_root(config.root, f"{own.image}/{own.kernel}")
    try:
        # x86-64: every bzImage is an EFI executable. arm64: a packaged vmlinuz may be
        # gzip-compressed (firmware cannot run it), a mistake worth a log line, not a hang.
        if arch != X86_64 and (found := machine(os.pread(kernel.fd, 4096, 0))) != arch:
            raise UkiError(f"{own.image}/{own.kernel} is an {found} kernel, not {arch}")
        initrd = jail.open_in_root(config.root, f"{own.image}/{own.initrd}")
    except UkiError as exc:
        os.close(kernel.fd)
        raise UkiError(f"{own.image}/{own.kernel} cannot be the {arch} image's kernel: "
                       f"{exc.message}",
                       hint="an arm64 kernel must be the bare Image, not a compressed vmlinuz"
                       ) from exc  # fmt: skip
    except BaseException:
        os.close(kernel.fd)
        raise
    return stub, kernel, initrd


async def _send_file(response: web.StreamResponse, opened: jail.OpenedFile, pad: int) -> None:
    """The file's first ``opened.size`` bytes (its size when the jail opened it: the
    Content-Length was promised from it) through ``response``, then ``pad`` zero bytes;
    reads off the loop."""
    offset = 0
    while offset < opened.size:
        want = min(UKI_CHUNK, opened.size - offset)
        chunk = await asyncio.to_thread(os.pread, opened.fd, want, offset)
        if not chunk:
            raise ConnectionResetError(f"{opened.path} shrank while it was sent")
        await response.write(chunk)
        offset += len(chunk)
    if pad:
        await response.write(bytes(pad))


async def boot_uki(request: web.Request) -> web.StreamResponse:
    """The machine's boot as a unified kernel image (module docstring), streamed."""
    machine = _machine(request)
    if isinstance(machine, web.Response):
        return machine
    profile, config = machine.profile, request.app[CONFIG]
    head_only = request.method == "HEAD"  # UEFI HTTP Boot asks for the size first
    arch = request.query.get("arch", X86_64)
    if arch not in ARCHES:
        return web.Response(status=400, text=f"unknown ?arch= {arch[:20]!r}: "
                                             f"one of {', '.join(ARCHES)}\n")  # fmt: skip
    own = profile.artefacts(arch)
    if own is None:
        log.warning("unified kernel image for %s refused: profile %s has no %s artefacts "
                    "(its %s: mapping)", machine.mac, profile.name, arch, arch)  # fmt: skip
        return web.Response(
            status=404, text=f"no {arch} boot for {machine.mac}: profile {profile.name} has none\n"
        )
    try:
        stub, kernel, initrd = await asyncio.to_thread(_open_uki_parts, config, own, arch)
    except (UkiError, jail.Refused) as exc:
        log.warning("%s unified kernel image for %s (profile %s) not made: %s", arch,
                    machine.mac, profile.name, exc.message)  # fmt: skip
        return web.Response(status=404, text=f"no boot image for {machine.mac}\n")
    try:
        seed_url = await _seed_url(request, machine, mint=not head_only)
        cmdline = profile.uki_cmdline(machine.mac, machine.base, seed_url, arch)
        osrel = f'ID=hatchery\nNAME="Hatchery {profile.role}"\nIMAGE_ID={own.image}\n'
        try:
            parts: UkiLayout = layout(stub, cmdline=cmdline, osrel=osrel, arch=arch,
                                      kernel_size=kernel.size, initrd_size=initrd.size)  # fmt: skip
        except UkiError as exc:
            log.error("unified kernel image for %s not made: %s", machine.mac, exc.message)
            return web.Response(status=500, text="cannot make the boot image\n")
        response = web.StreamResponse(headers={**NO_STORE, "Content-Type": "application/efi"})
        response.content_length = parts.size
        await response.prepare(request)
        if not head_only:
            await response.write(parts.head)
            await _send_file(response, kernel, parts.kernel_pad)
            await _send_file(response, initrd, parts.initrd_pad)
            count_sent(request, parts.size)
            log.info("unified kernel image for %s: profile %s (%s image %s), %d bytes, to %s%s",
                     machine.mac, profile.name, arch, own.image, parts.size, machine.client,
                     ", with a seed token" if seed_url else "")  # fmt: skip
        await response.write_eof()
        return response
    finally:
        os.close(kernel.fd)
        os.close(initrd.fd)


async def seed(request: web.Request) -> web.StreamResponse:
    """The machine's seed, sealed to the public key in the body (``hatchery.sealing``), for
    its live birth token from the address it was minted for."""
    config = request.app[CONFIG]
    body = await request.content.read(KEY_SIZE + 1)
    try:
        recipient = public_key(body)
    except SealError as exc:  # checked before the token: a bad body burns nothing
        return web.Response(status=400, text=f"{exc.message}\n", headers=NO_STORE)
    client = _client_ip(request)
    births, seeds = config.births, config.seeds
    grant: Grant | None = None
    if births is not None and seeds is not None and client is not None:
        grant = request.app[TOKENS].redeem(
            request.match_info["token"], client, time.monotonic(),
            lambda g: births.birth_address(g.mac, g.ip.version) == g.ip,
        )  # fmt: skip
    data = await asyncio.to_thread(seeds.read, grant.mac) if grant and seeds else None
    if grant is None or data is None:
        # One answer for every refusal: the body says nothing about which check failed.
        log.info("seed refused to %s", request.remote)  # never the token: it may be live
        return web.Response(status=404, text="not found\n", headers=NO_STORE)
    try:
        sealed = seal(data, recipient)
    except SealError as exc:
        log.warning("seed for %s not handed to %s: %s", grant.mac, client, exc.message)
        return web.Response(status=400, text=f"{exc.message}\n", headers=NO_STORE)
    log.info("seed for %s handed to %s, sealed to its key; its token is burnt", grant.mac, client)
    return web.Response(body=sealed, content_type="application/octet-stream", headers=NO_STORE)


class _OpenedFileResponse(web.FileResponse):
    """A ``FileResponse`` for a file the jail opened and checked, sent from that descriptor.

    ``FileResponse`` takes a path, so it gets ``/proc/self/fd/N``: opening that magic link
    opens the very file behind the descriptor (no name is resolved again). The descriptor is
    closed once the response is sent (aiohttp prepares a handler's response after the
    handler returns, so the handler itself cannot close it).

    The body (the whole file or the range aiohttp worked out) goes through ``pump``; the
    headers first, through the transport as usual.
    """

    def __init__(self, opened: jail.OpenedFile, pump: SendfilePump) -> None:
        content_type = _TYPES.guess_type(opened.path)[0] or "application/octet-stream"
        super().__init__(
            f"/proc/self/fd/{opened.fd}",
            chunk_size=1 << 20,
            headers={"Content-Type": content_type},
        )
        self._fd: int | None = opened.fd
        self._pump = pump

    async def _sendfile(
        self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if (
            count < PUMP_FROM
            or transport is None
            or sock is None
            or transport.get_extra_info("sslcontext") is not None
        ):  # a script or an iPXE binary: one sendfile call on the loop costs less
            return await super()._sendfile(request, fobj, offset, count)
        # Corked (nginx's tcp_nopush): the headers leave with the body's first segment.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        writer = await web.StreamResponse.prepare(self, request)  # the headers
        assert writer is not None
        try:
            # They must leave before the body. They are out at once unless a client that
            # does not read filled the socket with an earlier answer: then back off, so a
            # stuck connection costs a wake-up a second, not a thousand.
            pause = 0.001
            while transport.get_write_buffer_size():
                if transport.is_closing():
                    raise ConnectionResetError("Connection lost")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
            transport.pause_reading()  # as loop.sendfile does: nothing else uses the socket
            await self._pump.send(sock.fileno(), fobj.fileno(), offset, count)
        finally:
            if not transport.is_closing():
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                transport.resume_reading()
        await web.StreamResponse.write_eof(self)
        return writer

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            writer = await super().prepare(request)
        finally:
            self._close()
        if self.status in (200, 206) and request.method == "GET":
            count_sent(request, self.content_length or 0)
        return writer

    def _close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self._close()  # never prepared: the connection went away before the answer


async def artefact(request: web.Request) -> web.StreamResponse:
    """A file below the artefact root, through the path jail shared with TFTP."""
    rel = request.match_info["path"]
    try:
        opened = jail.open_in_root(request.app[CONFIG].root, rel)
    except jail.Refused as exc:
        log.info("artefact %r refused: %s", rel[:200], exc.message)
        return web.Response(status=404, text=f"not found: {rel[:200]}\n")
    return _OpenedFileResponse(opened, request.app[PUMP])


async def ipxe_binary(request: web.Request) -> web.StreamResponse:
    # One plain file name, no path: Debian's ipxe.efi is a symlink to /boot/ipxe.efi, so
    # symlinks are followed here, but a name cannot leave the folder.
    name = request.match_info["name"]
    folder = request.app[CONFIG].ipxe_dir
    if folder is None or not _NAME.match(name) or not (folder / name).is_file():
        return web.Response(status=404, text=f"no iPXE binary {name[:100]!r}\n")
    return web.FileResponse(folder / name)


async def _pump_ctx(app: web.Application) -> AsyncIterator[None]:
    pump = app[PUMP]
    pump.start()
    try:
        yield
    finally:
        pump.stop()


def make_app(config: BootHttpConfig) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[TOKENS] = BirthTokens(config.seed_ttl)
    app[PUMP] = SendfilePump("boot http sendfile")
    app[PORTS] = _Ports()
    app.cleanup_ctx.append(_pump_ctx)
    app.router.add_get("/boot/ipxe", boot_script)
    app.router.add_get("/boot/uki.efi", boot_uki)
    app.router.add_post("/seed/{token}", seed)
    app.router.add_get("/artefacts/{path:.+}", artefact)
    app.router.add_get("/ipxe/{name}", ipxe_binary)
    return app


class BootHttpServer:
    """The service started on ``host:port``, behind the connection limits every HTTP
    listener of the agent has (``hatchery.listener``); ``stop`` is idempotent. With ``tls``
    (a server context: the boot certificate) the same routes are also served over HTTPS on
    ``tls_port``, on the same addresses."""

    def __init__(
        self,
        config: BootHttpConfig,
        host: str | tuple[str, ...],
        port: int,
        limits: ConnectionLimits | None = None,
        meter: HttpMeter | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        tls_port: int = 0,
    ) -> None:
        # several hosts: the bridge's IPv4 and IPv6 addresses, one port (the first's if 0)
        self.hosts = (host,) if isinstance(host, str) else host
        if not self.hosts:
            raise BootHttpError("the boot HTTP service needs an address to listen on")
        self.config, self.host, self.port = config, self.hosts[0], port
        self.tls, self.tls_port = tls, tls_port
        self.limits = limits or ConnectionLimits()
        self.meter = meter
        self._listener: HttpListener | None = None

    @property
    def stats(self) -> ListenerStats | None:
        """Connections admitted, refused and cut; None before ``start``."""
        return self._listener.stats if self._listener is not None else None

    async def start(self) -> None:
        app = make_app(self.config)
        listener = HttpListener(app, self.limits, name="boot http", meter=self.meter)
        await listener.start()
        try:
            for host in self.hosts:
                self.port = await listener.listen(host, self.port, reuse_address=True)
            app[PORTS].plain = self.port
            if self.tls is not None:
                for host in self.hosts:
                    self.tls_port = await listener.listen(
                        host, self.tls_port, reuse_address=True, tls=self.tls
                    )
        except ListenerError as exc:
            await listener.close()
            raise BootHttpError(exc.message) from exc
        self._listener = listener
        where = ", ".join(f"[{h}]" if ":" in h else h for h in self.hosts)
        https = f", https on port {self.tls_port}" if self.tls is not None else ""
        log.info("boot http: serving %s on %s:%d%s", self.config.root, where, self.port, https)

    async def stop(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.close()


def boot_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The boot HTTPS service's context: server authentication only (firmware has no client
    certificate), TLS 1.2 or newer (edk2's TLS speaks 1.2)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise BootHttpError(f"cannot load the boot certificate ({cert}, {key}): {exc}") from exc
    return ctx
