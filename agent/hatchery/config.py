"""The agent's configuration: one small YAML file, validated at start, safe defaults.

Configuration is data: ``AgentConfig`` is frozen and built once in ``load_config``. Each
default exists once, in the dataclasses below: the parser reads a missing key's default from
default instances of them (``_BOOT``, ``_CAPACITY``, ``_AGENT``), never from a second
literal. Every error names the key that is wrong (``bridges[0].subnets[1].gateway: ...``)
so an operator can fix the file without reading code. Unknown keys are errors too: a typo
must not be silently ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from hatchery.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/hatchery/agent.yaml")
DEFAULT_STATE_DIR = Path("/data/var/lib/hatchery")
DEFAULT_TLS_DIR = Path("/etc/hatchery/tls")
API_PORT = 6976
DEFAULT_IMAGE_KEYS = Path("/etc/hatchery/image-keys")


@dataclass(frozen=True, slots=True)
class SubnetConfig:
    cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None = None
    dns: tuple[ipaddress.IPv4Address, ...] = ()
    pool_start: ipaddress.IPv4Address | None = None
    pool_end: ipaddress.IPv4Address | None = None


class DhcpMode(StrEnum):
    """How a bridge's boot service speaks DHCP (``boot.dhcp``)."""

    FULL = "full"  # we are the bridge's DHCP server: births range, VM leases, boot answers
    PROXY = "proxy"  # the site's server gives addresses; we give PXE/iPXE boot answers only


@dataclass(frozen=True, slots=True)
class Ipv6BootConfig:
    """IPv6 births (``boot.ipv6``): DHCPv6 addresses from ``births_start``..``births_end``,
    RAs with M=1, O=1 and ``prefix`` on-link (A=0); the bridge needs an address in
    ``prefix``, where the boot HTTP service then listens too."""

    births_start: ipaddress.IPv6Address
    births_end: ipaddress.IPv6Address
    prefix: ipaddress.IPv6Network
    router: bool = False  # True: RAs name this node the link's default router
    dns: tuple[ipaddress.IPv6Address, ...] = ()
    lease_time: int = 3600


#: systemd's EFI stub (Debian package systemd-boot-efi): the head of every unified kernel image
DEFAULT_UKI_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
#: the arm64 stub (systemd-boot-efi:arm64; tools/fetch-arm64-guest.sh unpacks one). The
#: hypervisor image carries the x86-64 stub only: a node births arm64 machines once the
#: operator puts this file on /data and names it in ``boot.uki_stub_arm64``.
DEFAULT_UKI_STUB_ARM64 = Path("/usr/lib/systemd/boot/efi/linuxaa64.efi.stub")


@dataclass(frozen=True, slots=True)
class BootHttpsConfig:
    """``boot.https``: the boot HTTP service also speaks TLS on ``port``, with a certificate
    from the boot CA (``hatchery ca init --rsa``) naming the bridge's addresses; UEFI HTTP
    Boot clients are then sent a whole boot image (UKI) over it, so firmware that pins the
    boot CA boots only what this node serves (docs/netboot.md, "HTTPS boot")."""

    cert: Path
    key: Path
    port: int = 8443


@dataclass(frozen=True, slots=True)
class BootServiceConfig:
    """Birthing peers on this bridge: DHCP for unknown machines, iPXE scripts, artefacts."""

    http_port: int = 8080
    dhcp: DhcpMode = DhcpMode.FULL
    births_start: ipaddress.IPv4Address | None = None
    births_end: ipaddress.IPv4Address | None = None
    profiles: Path | None = None  # default: every machine boots this node's running image
    seeds: Path = Path("/etc/hatchery/seeds")  # <mac>.tar files served to booting machines
    tftp: bool = False
    cmdline: str = "console=ttyS0 panic=30"
    ipv6: Ipv6BootConfig | None = None  # IPv6 births (DHCPv6 + managed RAs); None: IPv4 only
    https: BootHttpsConfig | None = None  # None: plain HTTP only (iPXE over HTTP for UEFI too)
    uki_stub: Path = DEFAULT_UKI_STUB  # UEFI HTTP Boot straight into a UKI (x86-64 with https)
    uki_stub_arm64: Path = DEFAULT_UKI_STUB_ARM64  # arm64 births (profiles' arm64: artefacts)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    name: str
    subnets: tuple[SubnetConfig, ...] = ()
    metadata: bool = True
    dhcp: bool = True
    boot: BootServiceConfig | None = None
    # ``metadata: {require_token: true}``: GETs need an IMDSv2 token (breaks NoCloud guests).
    metadata_require_token: bool = False


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The API's mutual-TLS files. ``crl``: the CA's revocation list, loaded into every TLS
    context and reloaded when it changes; a missing file means no revocation check (with a
    warning) until one is installed there (``PUT /v1/pki/crl`` writes it)."""

    ca: Path
    cert: Path
    key: Path
    crl: Path


@dataclass(frozen=True, slots=True)
class CapacityConfig:
    reserve_memory_mib: int = 1024
    reserve_cpus: int = 0
    reserve_disk_mib: int = 4096
    cpu_overcommit: float = 4.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Limits on every HTTP listener of the agent (API, metadata, boot HTTP), per listener.

    Why these defaults: one client (a VM, a machine on the boot network, a tenant) must not
    be able to hold the sockets, memory or file descriptors everyone else needs. 64
    connections is more than any honest client opens (curl, iPXE, cloud-init and the rollout
    tool use one or a few); 1024 per socket stays far below ``LimitNOFILE`` of the unit (65536),
    so the API, metadata and boot HTTP of several bridges fit at once. An idle keep-alive
    connection is closed after 15 s (aiohttp's default is an hour), and a connection that has
    not sent its first request's headers (TLS handshake included) after 10 s is cut off, so
    a client sending a byte at a time (slowloris) cannot hold a slot either.
    """

    per_client: int = 64  # connections open at once from one client address
    total: int = 1024  # connections open at once on one listening socket, all clients together
    idle_timeout: float = 15.0  # seconds a keep-alive connection may wait for a request
    header_timeout: float = 10.0  # seconds from accept to the first request's headers
    log_interval: float = 60.0  # at most one summary line of refusals per interval


@dataclass(frozen=True, slots=True)
class VmSourcesConfig:
    """Where a VM's kernel, initrd and disk may come from besides the image store.

    ``folders``: artefact folders whose files a VM request may name by absolute path (read
    through the path jail). URLs are fetched only from addresses that are none of loopback,
    link-local, multicast, unspecified or reserved, none of the node's own and none in
    ``management_networks``; at most ``max_download_bytes`` within ``download_timeout``
    seconds, redirects included.
    """

    folders: tuple[Path, ...] = ()
    management_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_download_bytes: int = 4 * 1024**3
    download_timeout: float = 1800.0


@dataclass(frozen=True, slots=True)
class VmIsolationConfig:
    """How each VM's QEMU is confined (config key ``vms``).

    ``unprivileged``: QEMU drops to a user of its own before it runs (``setpriv``: no
    capabilities, ``no_new_privs``), so a guest that escapes into QEMU can read and write
    only its own VM's disk and sockets, not another VM's, the agent's keys or /data. Off,
    QEMU runs as root as it did before (logged at start; for a node where it cannot work).

    ``uid_first``/``uid_count``: the uids handed out, one per VM, gid = uid. The default,
    0x7FF00000 and 65536 of them, sits in what systemd's UIDS-GIDS.md calls unused
    (1879048192-2147483647): above the container range (524288-1879048191), below
    systemd's foreign range (0x7FFE0000-0x7FFEFFFF) and below 2^31, where tools break.
    No /etc/passwd entries: nothing needs a name for them.

    ``log_limit_bytes``: the most a VM's console log (``run/console.log``) and its QEMU's
    output (``qemu.log``) may hold on disk each; past it, the oldest half is cut
    (``vms.logtrim``). 2 MiB, as libvirt's virtlogd keeps a console log by default.

    ``memory_overhead_mib``: what a VM's QEMU may hold beyond its guest's RAM, a direct
    boot's kernel and initrd and TCG's translation cache; past the sum the kernel reclaims,
    then OOM-kills that QEMU only (``vms.limits``).
    """

    unprivileged: bool = True
    uid_first: int = 0x7FF00000
    uid_count: int = 0x10000
    log_limit_bytes: int = 2 * 1024**2
    memory_overhead_mib: int = 512


@dataclass(frozen=True, slots=True)
class AgentConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    listen_host: str = "0.0.0.0"
    listen_port: int = API_PORT
    tls: TlsConfig = field(
        default_factory=lambda: TlsConfig(
            DEFAULT_TLS_DIR / "ca.pem",
            DEFAULT_TLS_DIR / "agent.pem",
            DEFAULT_TLS_DIR / "agent.key",
            DEFAULT_TLS_DIR / "crl.pem",
        )
    )
    policy: Path | None = None
    accel: str = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    bridges: tuple[BridgeConfig, ...] = ()
    image_keys: Path = DEFAULT_IMAGE_KEYS
    root: Path = Path("/")  # where live patches apply (tests point it elsewhere)
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    vm_sources: VmSourcesConfig = field(default_factory=VmSourcesConfig)
    vms: VmIsolationConfig = field(default_factory=VmIsolationConfig)


class _Reader:
    """Walks a mapping, remembering where it is so errors name the full key."""

    def __init__(self, data: Any, where: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
        self._data = dict(data)
        self._where = where
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._where}.{name}" if self._where else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self._used.add(name)
        value = self._data.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) and kind is int:
            raise ConfigError(f"{self.key(name)}: expected int, got bool")
        if not isinstance(value, kind):
            expected = (
                kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            )
            raise ConfigError(f"{self.key(name)}: expected {expected}, got {type(value).__name__}")
        return value

    def sub(self, name: str) -> _Reader:
        self._used.add(name)
        return _Reader(self._data.get(name), self.key(name))

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _ip(value: Any, key: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError as exc:
        raise ConfigError(f"{key}: not an IPv4 address: {value!r}") from exc


def _positive(value: int, key: str, minimum: int = 0) -> int:
    if value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value}")
    return value


def _subnet(r: _Reader) -> SubnetConfig:
    cidr_text = r.get("cidr", str)
    if cidr_text is None:
        raise ConfigError(f"{r.key('cidr')}: required")
    try:
        cidr = ipaddress.IPv4Network(cidr_text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"{r.key('cidr')}: {exc}") from exc
    gateway = r.get("gateway", str)
    gw = _ip(gateway, r.key("gateway")) if gateway else None
    if gw is not None and gw not in cidr:
        raise ConfigError(f"{r.key('gateway')}: {gw} is outside {cidr}")
    dns = tuple(_ip(d, r.key("dns")) for d in r.get("dns", list, []))
    pool = r.sub("pool")
    start_text, end_text = pool.get("start", str), pool.get("end", str)
    pool.finish()
    start = _ip(start_text, pool.key("start")) if start_text else None
    end = _ip(end_text, pool.key("end")) if end_text else None
    for addr, name in ((start, "start"), (end, "end")):
        if addr is not None and addr not in cidr:
            raise ConfigError(f"{pool.key(name)}: {addr} is outside {cidr}")
    if start is not None and end is not None and end < start:
        raise ConfigError(f"{pool.key('end')}: {end} is before pool start {start}")
    r.finish()
    return SubnetConfig(cidr, gw, dns, start, end)


_BRIDGE = BridgeConfig(name="")
_BOOT = BootServiceConfig()
_IPV6 = Ipv6BootConfig(
    ipaddress.IPv6Address("fd00::1"),
    ipaddress.IPv6Address("fd00::1"),
    ipaddress.IPv6Network("fd00::/64"),
)  # only its defaults are read
_CAPACITY = CapacityConfig()
_SOURCES = VmSourcesConfig()
_AGENT = AgentConfig()
_LIMITS = ConnectionLimits()
_VMS = VmIsolationConfig()


def _limits(r: _Reader) -> ConnectionLimits:
    def count(name: str, default: int) -> int:
        return _positive(r.get(name, int, default), r.key(name), minimum=1)

    def seconds(name: str, default: float) -> float:
        value = float(r.get(name, (int, float), default))
        if not value > 0:
            raise ConfigError(f"{r.key(name)}: must be > 0, got {value:g}")
        return value

    limits = ConnectionLimits(
        per_client=count("per_client", _LIMITS.per_client),
        total=count("total", _LIMITS.total),
        idle_timeout=seconds("idle_timeout", _LIMITS.idle_timeout),
        header_timeout=seconds("header_timeout", _LIMITS.header_timeout),
        log_interval=seconds("log_interval", _LIMITS.log_interval),
    )
    if limits.per_client > limits.total:
        raise ConfigError(
            f"{r.key('per_client')}: {limits.per_client} is more than total ({limits.total})"
        )
    r.finish()
    return limits


def _vm_sources(r: _Reader) -> VmSourcesConfig:
    folders = []
    for i, text in enumerate(r.get("folders", list, [])):
        if not isinstance(text, str) or not text.startswith("/") or text.rstrip("/") == "":
            raise ConfigError(
                f"{r.key('folders')}[{i}]: an absolute folder path (not /) is required"
            )
        folders.append(Path(text))
    networks = []
    for i, text in enumerate(r.get("management_networks", list, [])):
        try:
            networks.append(ipaddress.ip_network(str(text), strict=False))
        except ValueError as exc:
            raise ConfigError(f"{r.key('management_networks')}[{i}]: {exc}") from exc
    size = _positive(r.get("max_download_bytes", int, _SOURCES.max_download_bytes),
                     r.key("max_download_bytes"), 1)  # fmt: skip
    timeout = float(r.get("download_timeout", (int, float), _SOURCES.download_timeout))
    if timeout <= 0:
        raise ConfigError(f"{r.key('download_timeout')}: must be > 0")
    r.finish()
    return VmSourcesConfig(tuple(folders), tuple(networks), size, timeout)


def _vms(r: _Reader) -> VmIsolationConfig:
    first = r.get("uid_first", int, _VMS.uid_first)
    count = r.get("uid_count", int, _VMS.uid_count)
    if first < 65536:
        raise ConfigError(f"{r.key('uid_first')}: must be >= 65536 (above system, regular, "
                          f"dynamic users and nobody), got {first}")  # fmt: skip
    if count < 1 or first + count > 2**31:
        raise ConfigError(f"{r.key('uid_count')}: the range must hold >= 1 uid and end "
                          f"below 2^31, got {first}+{count}")  # fmt: skip
    log_limit = r.get("log_limit_bytes", int, _VMS.log_limit_bytes)
    if log_limit < 64 * 1024:
        raise ConfigError(f"{r.key('log_limit_bytes')}: must be >= 65536, got {log_limit}")
    overhead = r.get("memory_overhead_mib", int, _VMS.memory_overhead_mib)
    if overhead < 64:
        raise ConfigError(f"{r.key('memory_overhead_mib')}: must be >= 64 (QEMU itself needs "
                          f"that much), got {overhead}")  # fmt: skip
    config = VmIsolationConfig(r.get("unprivileged", bool, _VMS.unprivileged), first, count,
                               log_limit, overhead)  # fmt: skip
    r.finish()
    return config


def _bridge(r: _Reader) -> BridgeConfig:
    name = r.get("name", str)
    if not name or len(name) > 15 or "/" in name or " " in name:
        raise ConfigError(f"{r.key('name')}: an interface name of 1-15 characters is required")
    subnets_raw = r.get("subnets", list, [])
    subnets = tuple(
        _subnet(_Reader(s, f"{r.key('subnets')}[{i}]")) for i, s in enumerate(subnets_raw)
    )
    metadata, require_token = _metadata(r)
    dhcp = r.get("dhcp", bool, _BRIDGE.dhcp)
    boot = _boot(r.sub("boot"), subnets) if r.get("boot", dict) is not None else None
    r.finish()
    return BridgeConfig(name, subnets, metadata, dhcp, boot, require_token)


def _metadata(bridge: _Reader) -> tuple[bool, bool]:
    """``metadata``: a bool (serve it or not), or a mapping (served) with ``require_token``."""
    value = bridge.get("metadata", (bool, dict), _BRIDGE.metadata)
    if isinstance(value, bool):
        return value, _BRIDGE.metadata_require_token
    r = bridge.sub("metadata")
    require_token = r.get("require_token", bool, _BRIDGE.metadata_require_token)
    r.finish()
    return True, require_token


def _boot(r: _Reader, subnets: tuple[SubnetConfig, ...]) -> BootServiceConfig:
    port = r.get("http_port", int, _BOOT.http_port)
    if not 0 < port < 65536:
        raise ConfigError(f"{r.key('http_port')}: not a port: {port}")
    births = r.sub("births")
    start_text, end_text = births.get("start", str), births.get("end", str)
    births.finish()
    start = _ip(start_text, births.key("start")) if start_text else None
    end = _ip(end_text, births.key("end")) if end_text else None
    if (start is None) != (end is None):
        raise ConfigError(f"{births.key('start')}: give both start and end, or neither")
    if start is not None and end is not None:
        if end < start:
            raise ConfigError(f"{births.key('end')}: {end} is before {start}")
        if not any(start in s.cidr and end in s.cidr for s in subnets):
            raise ConfigError(
                f"{births.key('start')}: the range is in none of the bridge's subnets"
            )
    mode_text = r.get("dhcp", str, _BOOT.dhcp.value)
    try:
        mode = DhcpMode(mode_text)
    except ValueError:
        raise ConfigError(f"{r.key('dhcp')}: must be full or proxy, not {mode_text!r}") from None
    if mode is DhcpMode.PROXY and start is not None:
        raise ConfigError(
            f"{births.key('start')}: a births range gives addresses, and in dhcp: proxy mode "
            "the site's DHCP server gives them; drop births"
        )
    profiles = r.get("profiles", str)
    config = BootServiceConfig(
        http_port=port,
        dhcp=mode,
        births_start=start,
        births_end=end,
        profiles=Path(profiles) if profiles else None,
        seeds=Path(r.get("seeds", str, str(_BOOT.seeds))),
        tftp=r.get("tftp", bool, _BOOT.tftp),
        cmdline=r.get("cmdline", str, _BOOT.cmdline),
        ipv6=_boot_ipv6(r.sub("ipv6"), mode) if r.get("ipv6", dict) is not None else None,
        https=_boot_https(r.sub("https"), port) if r.get("https", dict) is not None else None,
        uki_stub=Path(r.get("uki_stub", str, str(_BOOT.uki_stub))),
        uki_stub_arm64=Path(r.get("uki_stub_arm64", str, str(_BOOT.uki_stub_arm64))),
    )
    r.finish()
    return config


def _boot_https(r: _Reader, http_port: int) -> BootHttpsConfig:
    """``boot.https``: ``cert`` and ``key`` (required), ``port`` (default 8443)."""
    cert, key = r.get("cert", str), r.get("key", str)
    if not cert or not key:
        raise ConfigError(f"{r.key('cert')}: HTTPS boot needs the boot certificate's cert and "
                          "key (hatchery ca issue --dir BOOT_CA --server BRIDGE_IP)")  # fmt: skip
    port = r.get("port", int, 8443)
    if not 0 < port < 65536 or port == http_port:
        raise ConfigError(f"{r.key('port')}: not a port, or the plain HTTP one: {port}")
    config = BootHttpsConfig(Path(cert), Path(key), port)
    r.finish()
    return config


def _ip6(value: Any, key: str) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(str(value))
    except ValueError as exc:
        raise ConfigError(f"{key}: not an IPv6 address: {value!r}") from exc


def _boot_ipv6(r: _Reader, mode: DhcpMode) -> Ipv6BootConfig:
    """``boot.ipv6``: ``births: {start, end}`` (required), ``prefix`` (default: the /64 of
    start), ``router``, ``dns``, ``lease_time``."""
    if mode is DhcpMode.PROXY:
        raise ConfigError(f"{r.key('births')}: IPv6 births give addresses by DHCPv6, "
                          "which dhcp: proxy mode does not; drop boot.ipv6 or proxy")  # fmt: skip
    births = r.sub("births")
    start_text, end_text = births.get("start", str), births.get("end", str)
    births.finish()
    if not start_text or not end_text:
        raise ConfigError(f"{births.key('start')}: IPv6 births need both start and end")
    start, end = _ip6(start_text, births.key("start")), _ip6(end_text, births.key("end"))
    if end < start:
        raise ConfigError(f"{births.key('end')}: {end} is before {start}")
    prefix_text = r.get("prefix", str)
    try:
        prefix = (
            ipaddress.IPv6Network(prefix_text, strict=True)
            if prefix_text
            else ipaddress.IPv6Network(f"{start}/64", strict=False)
        )
    except ValueError as exc:
        raise ConfigError(f"{r.key('prefix')}: {exc}") from exc
    if start not in prefix or end not in prefix:
        raise ConfigError(f"{births.key('start')}: {start}-{end} is not inside {prefix}")
    if prefix.is_link_local or prefix.is_multicast or prefix.prefixlen > 126:
        raise ConfigError(f"{r.key('prefix')}: {prefix} cannot be a link's birth prefix "
                          "(link-local, multicast or longer than /126)")  # fmt: skip
    dns = tuple(_ip6(d, r.key("dns")) for d in r.get("dns", list, []))
    lease = _positive(r.get("lease_time", int, _IPV6.lease_time), r.key("lease_time"), 60)
    config = Ipv6BootConfig(start, end, prefix, r.get("router", bool, _IPV6.router), dns, lease)
    r.finish()
    return config


def parse_config(data: Any) -> AgentConfig:
    """Validate the parsed YAML document and build the frozen config."""
    r = _Reader(data, "")
    defaults = _AGENT
    state_dir = Path(r.get("state_dir", str, str(defaults.state_dir)))
    listen = r.get("listen", str, f"{defaults.listen_host}:{defaults.listen_port}")
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"listen: expected HOST:PORT, got {listen!r}")
    tls_r = r.sub("tls")
    tls = TlsConfig(
        Path(tls_r.get("ca", str, str(defaults.tls.ca))),
        Path(tls_r.get("cert", str, str(defaults.tls.cert))),
        Path(tls_r.get("key", str, str(defaults.tls.key))),
        Path(tls_r.get("crl", str, str(defaults.tls.crl))),
    )
    tls_r.finish()
    policy = r.get("policy", str)
    qemu = r.sub("qemu")
    accel = qemu.get("accel", str, defaults.accel)
    if accel not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"qemu.accel: must be auto, kvm or tcg, not {accel!r}")
    binary = qemu.get("binary", str, defaults.qemu_binary)
    qemu.finish()
    cap = r.sub("capacity")
    capacity = CapacityConfig(
        reserve_memory_mib=_positive(
            cap.get("reserve_memory_mib", int, _CAPACITY.reserve_memory_mib),
            cap.key("reserve_memory_mib"),
        ),
        reserve_cpus=_positive(
            cap.get("reserve_cpus", int, _CAPACITY.reserve_cpus), cap.key("reserve_cpus")
        ),
        reserve_disk_mib=_positive(
            cap.get("reserve_disk_mib", int, _CAPACITY.reserve_disk_mib),
            cap.key("reserve_disk_mib"),
        ),
        cpu_overcommit=float(cap.get("cpu_overcommit", (int, float), _CAPACITY.cpu_overcommit)),
    )
    if capacity.cpu_overcommit <= 0:
        raise ConfigError(f"{cap.key('cpu_overcommit')}: must be > 0")
    cap.finish()
    bridges = tuple(
        _bridge(_Reader(b, f"bridges[{i}]")) for i, b in enumerate(r.get("bridges", list, []))
    )
    names = [b.name for b in bridges]
    if len(set(names)) != len(names):
        raise ConfigError("bridges: a bridge is listed twice")
    image_keys = Path(r.get("image_keys", str, str(defaults.image_keys)))
    root = Path(r.get("root", str, str(defaults.root)))
    limits = _limits(r.sub("limits"))
    vm_sources = _vm_sources(r.sub("vm_sources"))
    vms = _vms(r.sub("vms"))
    r.finish()
    return AgentConfig(
        state_dir=state_dir,
        listen_host=host.strip("[]") or defaults.listen_host,
        listen_port=int(port_text),
        tls=tls,
        policy=Path(policy) if policy else None,
        accel=accel,
        qemu_binary=binary,
        capacity=capacity,
        bridges=bridges,
        image_keys=image_keys,
        root=root,
        limits=limits,
        vm_sources=vm_sources,
        vms=vms,
    )


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``path``; a missing default file means "all defaults"."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if path == DEFAULT_CONFIG_PATH:
            return AgentConfig()
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", hint=exc.hint) from exc
