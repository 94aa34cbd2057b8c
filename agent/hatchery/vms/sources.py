"""Where a VM's kernel, initrd and disk image may come from, and fetching them for a VM.

A VM request comes from a tenant's certificate, so every source it names is hostile until
checked. There are three kinds and nothing else:

- ``StoreArtefact``: an artefact of an image in the node's store (``{"image": "v2",
  "artefact": "vmlinux"}``; by role or by file name). The store verified the image's
  signature when it was added, and the content is hashed again while it is copied.
- ``FolderFile``: an absolute path inside one of the operator's artefact folders
  (``vm_sources.folders``), opened through the one path jail (``hatchery.jail``): no
  ``..``, no symlink leading out, only regular files. Any other host path is refused, so a
  request cannot make the agent hand ``/etc/hatchery/tls/agent.key`` to a guest as its
  initrd.
- ``Url``: http(s), fetched by ``fetch_url``, which refuses every address a tenant must not
  reach through the node (loopback, link-local, multicast, unspecified, reserved, the node's
  own addresses, the management networks), checks each resolved address and each redirect
  itself, connects to exactly the addresses it checked, and caps size and time.

Every source is copied into the VM's own folder when the VM is created; QEMU and
``qemu-img`` only ever open those copies, so nothing a source names can change under them
later. A refusal is a ``SourceError`` naming the request field (a 400).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from hatchery import jail, netdev
from hatchery.config import VmSourcesConfig
from hatchery.errors import HatcheryError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
HINT = (
    'use an image in the store ({"image": VERSION, "artefact": ROLE_OR_NAME}), a file in one '
    "of the node's artefact folders (vm_sources.folders) or an http(s) URL"
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SourceError(HatcheryError):
    """A VM source that is refused or cannot be fetched; ``field`` names the request field."""

    def __init__(self, message: str, field: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


@dataclass(frozen=True, slots=True)
class StoreArtefact:
    image: str
    artefact: str

    def __str__(self) -> str:
        return f"image {self.image}, artefact {self.artefact}"


@dataclass(frozen=True, slots=True)
class FolderFile:
    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True, slots=True)
class Url:
    url: str

    def __str__(self) -> str:
        return self.url


Source = StoreArtefact | FolderFile | Url


def parse_source(value: object, field: str) -> Source:
    """The source a request field names: a URL or an absolute path as a string, a store
    artefact as ``{"image", "artefact"}``. Only the form is checked here (pure); whether a
    path lies in an artefact folder is checked when it is opened."""
    if isinstance(value, dict):
        if set(value) != {"image", "artefact"} or not all(
            isinstance(v, str) and 0 < len(v) <= 128 for v in value.values()
        ):
            raise SourceError(f"{field}: a store artefact is {{\"image\": VERSION, \"artefact\": "
                              "ROLE_OR_NAME}} (strings)", field, hint=HINT)  # fmt: skip
        return StoreArtefact(value["image"], value["artefact"])
    if not isinstance(value, str) or not value or len(value) > 4096 or "\x00" in value:
        raise SourceError(f"{field} must be a string or a store artefact", field, hint=HINT)
    if value.startswith(("http://", "https://")):
        try:
            host = urlsplit(value).hostname
        except ValueError:
            host = None
        if not host:
            raise SourceError(f"{field}: {value[:200]!r} is not a URL with a host", field)
        return Url(value)
    if not value.startswith("/"):
        raise SourceError(f"{field}: {value[:200]!r} is neither an absolute path nor an http(s)"
                          " URL", field, hint=HINT)  # fmt: skip
    return FolderFile(value)


# --- addresses ------------------------------------------------------------------------------
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # "this host" on Linux: 0.1.2.3 is loopback
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def refusal(address: Address, own: set[Address], management: tuple[Network, ...]) -> str | None:
    """Why a fetch must not go to ``address`` (None: it may). Pure.

    An IPv6 address that carries an IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by that too,
    since the packets end up there.
    """
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address.teredo is not None:
            inner = address.teredo[1]
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            reason = refusal(inner, own, management)
            if reason is not None:
                return reason
    kinds = (
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_reserved, "a reserved address"),
        (isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK,
         "an address of this host (0.0.0.0/8)"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local,
         "a site-local address"),
        (address in own, "one of the node's own addresses"),
    )  # fmt: skip
    for hit, why in kinds:
        if hit:
            return why
    for network in management:
        if address.version == network.version and address in network:
            return f"in the management network {network}"
    return None


def _address(text: str) -> Address:
    return ipaddress.ip_address(text.split("%", 1)[0])


class _PinnedResolver(AbstractResolver):
    """Answers only the host names already resolved and checked, with exactly the addresses
    checked: aiohttp connects to those and never resolves again (no time-of-check gap)."""

    def __init__(self) -> None:
        self.pinned: dict[str, list[ResolveResult]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            return [{**r, "port": port} for r in self.pinned[host]]
        except KeyError:
            raise OSError(f"{host} was not checked") from None

    async def close(self) -> None:
        return None


OwnAddresses = Callable[[], Awaitable[set[str]]]


class UrlFetcher:
    """Fetches tenant-given URLs into files, refusing addresses a tenant must not reach."""

    def __init__(self, config: VmSourcesConfig, own: OwnAddresses = netdev.local_addresses):
        self._config = config
        self._own = own

    async def _check_host(self, url: str, field: str, resolver: _PinnedResolver) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise SourceError(f"{field}: {url[:200]} is not an http(s) URL", field)
        host = parts.hostname
        if not host:
            raise SourceError(f"{field}: {url[:200]} has no host", field)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise SourceError(f"{field}: {url[:200]} has a bad port", field) from None
        own = {_address(a) for a in await self._own()}
        try:
            addresses = [_address(host)]  # an IP literal: aiohttp connects to it as it is
        except ValueError:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                raise SourceError(f"{field}: cannot resolve {host}: {exc}", field) from None
            addresses = [_address(str(info[4][0])) for info in infos]
            resolver.pinned[host] = [
                {"hostname": host, "host": str(info[4][0]), "port": port, "family": info[0],
                 "proto": info[2], "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV}
                for info in infos
            ]  # fmt: skip
        for address in addresses:
            why = refusal(address, own, self._config.management_networks)
            if why is not None:
                raise SourceError(
                    f"{field}: {url[:200]} leads to {address}, {why}: refused",
                    field,
                    hint="VM sources by URL must come from outside the node and its networks",
                )

    async def fetch(self, url: str, dest: Path, field: str) -> int:
        """Download ``url`` into ``dest`` (atomically); the byte count. Redirects are followed
        here, at most ``MAX_REDIRECTS``, each target checked like the first."""
        limit, timeout = self._config.max_download_bytes, self._config.download_timeout
        resolver = _PinnedResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
        tmp = dest.with_name(dest.name + ".part")
        try:
            async with (
                asyncio.timeout(timeout),
                aiohttp.ClientSession(connector=connector, trust_env=False) as session,
            ):
                current = url
                for _ in range(MAX_REDIRECTS + 1):
                    await self._check_host(current, field, resolver)
                    async with session.get(current, allow_redirects=False) as resp:
                        if resp.status in REDIRECTS and "Location" in resp.headers:
                            current = urljoin(current, resp.headers["Location"])
                            continue
                        if resp.status != 200:
                            raise SourceError(f"{field}: {url[:200]}: HTTP {resp.status}", field)
                        if (resp.content_length or 0) > limit:
                            raise SourceError(f"{field}: {url[:200]} is larger than {limit} "
                                              "bytes", field)  # fmt: skip
                        size = 0
                        with tmp.open("wb") as out:
                            async for chunk in resp.content.iter_chunked(CHUNK):
                                size += len(chunk)
                                if size > limit:
                                    raise SourceError(f"{field}: {url[:200]} is larger than "
                                                      f"{limit} bytes", field)  # fmt: skip
                                out.write(chunk)
                        tmp.replace(dest)
                        log.info("downloaded %s (%d bytes)", url, size)
                        return size
                raise SourceError(f"{field}: {url[:200]}: more than {MAX_REDIRECTS} redirects",
                                  field)  # fmt: skip
        except TimeoutError:
            raise SourceError(f"{field}: {url[:200]}: not fetched within {timeout:g}s",
                              field) from None  # fmt: skip
        except aiohttp.ClientError as exc:
            raise SourceError(f"{field}: cannot download {url[:200]}: "
                              f"{exc or type(exc).__name__}", field) from exc  # fmt: skip
        finally:
            tmp.unlink(missing_ok=True)


# --- the store and the folders ---------------------------------------------------------------
class ArtefactStore(Protocol):
    """What fetching needs from the image store (the agent passes its ``ImageStore``)."""

    def artefact_chunks(self, version: str, artefact: str) -> Iterator[bytes]:
        """The verified content of an artefact (by role or file name) of a stored image;
        raises a ``HatcheryError`` when there is no such image or artefact, or it is corrupt."""
        ...


def _write_chunks(chunks: Iterator[bytes], dest: Path) -> int:
    tmp = dest.with_name(dest.name + ".part")
    size = 0
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                size += len(chunk)
                out.write(chunk)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def _copy_fd(fd: int, dest: Path) -> int:
    """Copy the open file ``fd`` (closed here, whatever happens) into ``dest``."""
    try:
        return _write_chunks(iter(lambda: os.read(fd, CHUNK), b""), dest)
    finally:
        os.close(fd)


class SourceFetcher:
    """Copies a VM's sources into its folder: from the store, an artefact folder or a URL."""

    def __init__(
        self,
        config: VmSourcesConfig,
        store: ArtefactStore | None = None,
        urls: UrlFetcher | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._urls = urls or UrlFetcher(config)

    def open_in_folder(self, path: str, field: str) -> jail.OpenedFile:
        """Open ``path`` through the jail of the artefact folder it names, or refuse."""
        for folder in self._config.folders:
            prefix = str(folder).rstrip("/") + "/"
            if path.startswith(prefix):
                try:
                    return jail.open_in_root(folder, path[len(prefix) :])
                except jail.Refused as exc:
                    raise SourceError(f"{field}: {path[:200]}: {exc.message}", field,
                                      hint=HINT) from None  # fmt: skip
        raise SourceError(f"{field}: {path[:200]} is not in an artefact folder of this node",
                          field, hint=HINT)  # fmt: skip

    async def fetch(self, source: Source, dest: Path, field: str) -> None:
        """Put the content of ``source`` into ``dest`` (atomically), or ``SourceError``."""
        if isinstance(source, Url):
            await self._urls.fetch(source.url, dest, field)
        elif isinstance(source, FolderFile):
            opened = self.open_in_folder(source.path, field)
            await asyncio.to_thread(_copy_fd, opened.fd, dest)
        else:
            if self._store is None:
                raise SourceError(f"{field}: this agent has no image store", field)
            store = self._store
            try:
                await asyncio.to_thread(
                    _write_chunks, store.artefact_chunks(source.image, source.artefact), dest
                )
            except SourceError:
                raise
            except HatcheryError as exc:
                raise SourceError(f"{field}: {source}: {exc.message}", field) from exc
