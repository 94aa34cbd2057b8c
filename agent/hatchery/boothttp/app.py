"""The boot HTTP service (aiohttp).

- ``GET /boot/ipxe?mac=MAC``: the iPXE script of that machine's profile (pxe/profiles.yaml);
  an unknown MAC gets the default profile, or 404 with a reason when there is none.
- ``GET /artefacts/PATH``: kernels and initrds under the artefact root;
  ``GET /ipxe/NAME``: the iPXE binaries (for UEFI HTTP Boot clients). Both are sent with
  ``FileResponse``: range requests, conditional GETs, and the kernel's sendfile (zero copy).

Artefact paths go through the path jail shared with TFTP (``hatchery.jail``): no absolute
names, no ``..``, the resolved file must lie inside the root, and the file is served from
the descriptor the jail checked, not re-opened by name. Every refusal is a 404 that says no
more than "not found".
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from hatchery import jail
from hatchery.boothttp.profiles import Profiles
from hatchery.config import ConnectionLimits
from hatchery.dhcp.leases import normalise_mac
from hatchery.errors import HatcheryError
from hatchery.listener import HttpListener, ListenerError, ListenerStats

log = logging.getLogger(__name__)

_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
DEFAULT_IPXE_DIR = Path("/usr/lib/ipxe")
# Loaded once at import: the first lookup in the global table reads /etc/mime.types (ms),
# and a request must not wait for it (busybox nc half-closes right after its request, and
# aiohttp drops the connection when that FIN is read before the answer is written).
_TYPES = mimetypes.MimeTypes()


class BootHttpError(HatcheryError):
    """The boot HTTP service cannot start."""


@dataclass(frozen=True, slots=True)
class BootHttpConfig:
    root: Path  # artefact root: <root>/<image>/vmlinuz, <root>/<image>/initrd
    profiles: Profiles | None = None  # None: no scripts (every MAC refused)
    ipxe_dir: Path | None = DEFAULT_IPXE_DIR
    public_url: str | None = None  # base URL written into scripts; default: from Host


CONFIG = web.AppKey("config", BootHttpConfig)


def _base_url(request: web.Request, config: BootHttpConfig) -> str:
    if config.public_url:
        return config.public_url.rstrip("/")
    host = request.host
    if not _HOST.match(host):  # never echo a strange Host header into a script
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        host = f"{sockname[0]}:{sockname[1]}" if sockname else "localhost"
    return f"http://{host}"


async def boot_script(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    raw = request.query.get("mac", "")
    try:
        mac = normalise_mac(raw)
    except ValueError:
        return web.Response(status=400, text=f"no valid ?mac= given: {raw[:40]!r}\n")
    profile = config.profiles.for_mac(mac) if config.profiles is not None else None
    if profile is None:
        log.info("boot script refused for %s: no profile and no default", mac)
        return web.Response(
            status=404, text=f"no boot profile for {mac} and no default profile configured\n"
        )
    log.info("boot script for %s: profile %s (image %s)", mac, profile.name, profile.image)
    return web.Response(
        text=profile.render(mac, _base_url(request, config)), content_type="text/plain"
    )


class _OpenedFileResponse(web.FileResponse):
    """A ``FileResponse`` for a file the jail opened and checked, sent from that descriptor.

    ``FileResponse`` takes a path, so it gets ``/proc/self/fd/N``: opening that magic link
    opens the very file behind the descriptor (no name is resolved again). The descriptor is
    closed once the response is sent (aiohttp prepares a handler's response after the
    handler returns, so the handler itself cannot close it).
    """

    def __init__(self, opened: jail.OpenedFile) -> None:
        content_type = _TYPES.guess_type(opened.path)[0] or "application/octet-stream"
        super().__init__(
            f"/proc/self/fd/{opened.fd}",
            chunk_size=1 << 20,
            headers={"Content-Type": content_type},
        )
        self._fd: int | None = opened.fd

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        finally:
            self._close()

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
    return _OpenedFileResponse(opened)


async def ipxe_binary(request: web.Request) -> web.StreamResponse:
    # One plain file name, no path: Debian's ipxe.efi is a symlink to /boot/ipxe.efi, so
    # symlinks are followed here, but a name cannot leave the folder.
    name = request.match_info["name"]
    folder = request.app[CONFIG].ipxe_dir
    if folder is None or not _NAME.match(name) or not (folder / name).is_file():
        return web.Response(status=404, text=f"no iPXE binary {name[:100]!r}\n")
    return web.FileResponse(folder / name)


def make_app(config: BootHttpConfig) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app.router.add_get("/boot/ipxe", boot_script)
    app.router.add_get("/artefacts/{path:.+}", artefact)
    app.router.add_get("/ipxe/{name}", ipxe_binary)
    return app


class BootHttpServer:
    """The service started on ``host:port``, behind the connection limits every HTTP
    listener of the agent has (``hatchery.listener``); ``stop`` is idempotent."""

    def __init__(
        self,
        config: BootHttpConfig,
        host: str,
        port: int,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.config, self.host, self.port = config, host, port
        self.limits = limits or ConnectionLimits()
        self._listener: HttpListener | None = None

    @property
    def stats(self) -> ListenerStats | None:
        """Connections admitted, refused and cut; None before ``start``."""
        return self._listener.stats if self._listener is not None else None

    async def start(self) -> None:
        listener = HttpListener(make_app(self.config), self.limits, name="boot http")
        await listener.start()
        try:
            self.port = await listener.listen(self.host, self.port, reuse_address=True)
        except ListenerError as exc:
            await listener.close()
            raise BootHttpError(exc.message) from exc
        self._listener = listener
        log.info("boot http: serving %s on %s:%d", self.config.root, self.host, self.port)

    async def stop(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.close()
