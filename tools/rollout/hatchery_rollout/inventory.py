"""The fleet inventory: which hosts exist, where they stand and how to reach their agents.

Two forms, the same result:

* one YAML file::

      levels: [region, building, rack]   # names of the location levels, outermost first
      port: 6976                         # default agent port (optional)
      hosts:
        - name: hv1
          address: 10.1.0.11:6976        # host:port, or host alone for the default port
          location: eu/fra1/r1           # any depth up to len(levels)
          labels: {gpu: a100}            # optional, string values
          vms: 3                         # optional VM count (used to upgrade empty hosts first)

* a directory tree of locations, like SmallStack's topology: every directory is a location
  (``eu/fra1/r1/``) and may hold a ``hosts.yaml`` listing its hosts (the same host mappings,
  without ``location``); the root may hold a ``fleet.yaml`` with ``levels`` and ``port``.

Every error names the file and the key that is wrong (``fleet.yaml: hosts[3].address: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hatchery_rollout.errors import InventoryError

DEFAULT_PORT = 6976
DEFAULT_LEVELS = ("region", "building", "rack")
HOSTS_FILE = "hosts.yaml"
FLEET_FILE = "fleet.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST_KEYS = frozenset({"name", "address", "location", "labels", "vms"})


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    address: str  # host:port of the agent API
    location: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    vms: int | None = None

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)


@dataclass(frozen=True, slots=True)
class Fleet:
    hosts: tuple[Host, ...]
    levels: tuple[str, ...] = DEFAULT_LEVELS
    source: str = ""
    by_name: Mapping[str, Host] = field(default_factory=dict, compare=False, repr=False)


def _address(value: Any, where: str, port: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InventoryError(f"{where}: expected host:port, got {value!r}")
    text = value.strip()
    if text.startswith("["):  # [v6]:port or [v6]
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        host = f"[{host}]"
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host or " " in host:
        raise InventoryError(f"{where}: bad host in {value!r}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InventoryError(f"{where}: bad port in {value!r} (expected 1-65535)")
        port = int(port_text)
    return f"{host}:{port}"


def _location(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        parts = [p for p in value.split("/") if p]
    elif isinstance(value, list):
        parts = [str(p) for p in value]
    else:
        raise InventoryError(f"{where}: expected a path like eu/fra1/r1, got {value!r}")
    for part in parts:
        if not _NAME.match(part):
            raise InventoryError(f"{where}: bad location part {part!r}")
    return tuple(parts)


def _host(data: Any, where: str, port: int, location: tuple[str, ...] | None) -> Host:
    if not isinstance(data, Mapping):
        raise InventoryError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - _HOST_KEYS)
    if unknown:
        raise InventoryError(f"{where}.{unknown[0]}: unknown key")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InventoryError(f"{where}.name: a host name of letters, digits, . _ - is required")
    address = _address(data.get("address"), f"{where}.address", port)
    if location is None:
        loc = _location(data.get("location"), f"{where}.location")
    elif "location" in data:
        raise InventoryError(f"{where}.location: set by the directory in a location tree")
    else:
        loc = location
    labels_raw = data.get("labels") or {}
    if not isinstance(labels_raw, Mapping):
        raise InventoryError(f"{where}.labels: expected a mapping")
    labels: list[tuple[str, str]] = []
    for key, val in labels_raw.items():
        if not isinstance(val, str | int | float) or isinstance(val, bool):
            raise InventoryError(f"{where}.labels.{key}: expected a string")
        labels.append((str(key), str(val)))
    vms = data.get("vms")
    if vms is not None and (not isinstance(vms, int) or isinstance(vms, bool) or vms < 0):
        raise InventoryError(f"{where}.vms: expected an integer >= 0, got {vms!r}")
    return Host(name, address, loc, tuple(sorted(labels)), vms)


# libyaml's safe loader when PyYAML was built with it: ten times faster on a 10 000-host
# inventory (seconds of the survey otherwise), the same documents and errors.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_LOADER)  # noqa: S506 (a safe loader)
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InventoryError(f"{path}: not valid YAML: {exc}") from exc


def _header(data: Any, where: str) -> tuple[tuple[str, ...], int]:
    if data is None:
        return DEFAULT_LEVELS, DEFAULT_PORT
    if not isinstance(data, Mapping):
        raise InventoryError(f"{where}: expected a mapping, got {type(data).__name__}")
    levels_raw = data.get("levels", list(DEFAULT_LEVELS))
    if not isinstance(levels_raw, list) or not all(
        isinstance(x, str) and _NAME.match(x) for x in levels_raw
    ):
        raise InventoryError(f"{where}: levels: expected a list of names, got {levels_raw!r}")
    if len(set(levels_raw)) != len(levels_raw):
        raise InventoryError(f"{where}: levels: names must be unique")
    port = data.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise InventoryError(f"{where}: port: expected 1-65535, got {port!r}")
    return tuple(levels_raw), port


def _finish(hosts: list[Host], levels: tuple[str, ...], source: str) -> Fleet:
    seen: dict[str, Host] = {}
    addresses: dict[str, str] = {}
    for h in hosts:
        if h.name in seen:
            raise InventoryError(f"{source}: host {h.name!r} is listed twice")
        if h.address in addresses:
            raise InventoryError(
                f"{source}: hosts {addresses[h.address]!r} and {h.name!r} share {h.address}"
            )
        if len(h.location) > len(levels):
            raise InventoryError(
                f"{source}: host {h.name!r}: location {'/'.join(h.location)} is deeper than "
                f"the levels {list(levels)}"
            )
        seen[h.name] = h
        addresses[h.address] = h.name
    return Fleet(tuple(hosts), levels, source, seen)


def parse_fleet(data: Any, source: str = "fleet") -> Fleet:
    """Validate one parsed YAML document of the file form."""
    if not isinstance(data, Mapping):
        raise InventoryError(f"{source}: expected a mapping with 'hosts'")
    unknown = sorted(set(map(str, data)) - {"levels", "port", "hosts"})
    if unknown:
        raise InventoryError(f"{source}: {unknown[0]}: unknown key")
    levels, port = _header(data, source)
    raw = data.get("hosts") or []
    if not isinstance(raw, list):
        raise InventoryError(f"{source}: hosts: expected a list")
    hosts = [_host(h, f"{source}: hosts[{i}]", port, None) for i, h in enumerate(raw)]
    return _finish(hosts, levels, source)


def load_tree(root: Path) -> Fleet:
    """Load a directory tree of locations (see the module docstring)."""
    header = root / FLEET_FILE
    data = _read_yaml(header) if header.exists() else None
    if isinstance(data, Mapping):
        unknown = sorted(set(map(str, data)) - {"levels", "port"})
        if unknown:
            raise InventoryError(f"{header}: {unknown[0]}: unknown key")
    levels, port = _header(data, str(header))
    hosts: list[Host] = []
    for path in sorted(root.rglob(HOSTS_FILE)):
        rel = path.parent.relative_to(root)
        location = _location("/".join(rel.parts), str(path.parent))
        raw = _read_yaml(path) or []
        if not isinstance(raw, list):
            raise InventoryError(f"{path}: expected a list of hosts")
        hosts += [_host(h, f"{path}: [{i}]", port, location) for i, h in enumerate(raw)]
    return _finish(hosts, levels, str(root))


def load_fleet(path: Path) -> Fleet:
    """A fleet from a YAML file or a location tree."""
    if path.is_dir():
        return load_tree(path)
    if not path.exists():
        raise InventoryError(f"{path}: no such file or directory")
    return parse_fleet(_read_yaml(path), str(path))


def synthetic_fleet(n: int, *, base_port: int = DEFAULT_PORT) -> Fleet:
    """``n`` hosts named host00000… on 127.0.0.1 (for ``plan --hosts N``)."""
    width = max(5, len(str(n)))
    hosts = [
        Host(f"host{i:0{width}d}", f"127.0.0.1:{(base_port + i) % 65536 or 1}") for i in range(n)
    ]
    return Fleet(tuple(hosts), DEFAULT_LEVELS, f"{n} synthetic hosts", {h.name: h for h in hosts})
