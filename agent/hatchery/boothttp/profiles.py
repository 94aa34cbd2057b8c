"""Boot profiles (pxe/profiles.yaml): which image, kernel command line and role a machine
boots, chosen per MAC, per group of MACs, or by a default; and the iPXE script rendering.

Templates are iPXE scripts with ``{{name}}`` placeholders (iPXE itself owns ``${...}``).
Every placeholder a template uses must be known, checked when the profiles are loaded, so a
typo fails at start rather than when a node boots.

A profile's ``image``/``kernel``/``initrd`` are what x86-64 machines boot; an optional
``arm64:`` mapping names arm64's (its own image folder, kernel — the bare ``Image``, an EFI
executable — initrd, and command line, since the console differs: ``ttyAMA0``). arm64
machines boot only by UEFI HTTP Boot of a unified kernel image (Debian's iPXE has no arm64
build), so a profile without ``arm64:`` boots no arm64 machine.

A profile never names the machine's seed: the boot HTTP service appends
``hatchery.seed=<single-use URL>`` to the command line itself, for the machine holding the
birth lease only (a seed holds a private key; there is no public seed URL to write here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatchery.dhcp.leases import normalise_mac, read_yaml
from hatchery.errors import ConfigError

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")
PLACEHOLDERS = frozenset(
    {"base_url", "kernel_url", "initrd_url", "cmdline", "image", "role", "profile", "mac"}
)
#: The architectures a profile can name artefacts for (``?arch=`` of ``/boot/uki.efi``).
X86_64, ARM64 = "x86-64", "arm64"
ARCHES = (X86_64, ARM64)


@dataclass(frozen=True, slots=True)
class Artefacts:
    """What one architecture boots: ``<root>/<image>/<kernel>`` and ``.../<initrd>``."""

    image: str
    kernel: str
    initrd: str
    cmdline: str


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    image: str  # folder under the artefact root: artefacts/<image>/<kernel|initrd>
    role: str
    cmdline: str
    template: str  # the template text
    kernel: str = "vmlinuz"
    initrd: str = "initrd"
    arm64: Artefacts | None = None  # None: no arm64 machine boots this profile

    def artefacts(self, arch: str = X86_64) -> Artefacts | None:
        """What a machine of ``arch`` boots (None: nothing for that architecture)."""
        if arch == X86_64:
            return Artefacts(self.image, self.kernel, self.initrd, self.cmdline)
        return self.arm64 if arch == ARM64 else None

    def render(self, mac: str, base_url: str, seed_url: str | None = None) -> str:
        """The script for ``mac``; ``seed_url`` (a birth token's URL) ends the command line."""
        values = self._values(mac, base_url)
        values["cmdline"] = self.kernel_cmdline(mac, base_url, seed_url)
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)

    def kernel_cmdline(
        self, mac: str, base_url: str, seed_url: str | None = None, arch: str = X86_64
    ) -> str:
        """The kernel command line for ``mac`` (what the script passes, and a UKI holds)."""
        values = self._values(mac, base_url, arch)
        own = self.artefacts(arch)
        # The command line may name the machine too ({{mac}}, {{base_url}}, …).
        cmdline = _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)),
                                   own.cmdline if own else self.cmdline)  # fmt: skip
        if seed_url is not None:
            cmdline = f"{cmdline} hatchery.seed={seed_url}".strip()
        return cmdline

    def uki_cmdline(
        self, mac: str, base_url: str, seed_url: str | None = None, arch: str = X86_64
    ) -> str:
        """The whole command line a unified kernel image holds: what the default template
        adds to ``kernel_cmdline`` (role, image, ``BOOTIF``), since no script runs there."""
        bootif = "01-" + mac.replace(":", "-")
        own = self.artefacts(arch)
        image = own.image if own else self.image
        return (f"{self.kernel_cmdline(mac, base_url, seed_url, arch)} "
                f"hatchery.role={self.role} hatchery.image={image} BOOTIF={bootif}")  # fmt: skip

    def _values(self, mac: str, base_url: str, arch: str = X86_64) -> dict[str, str]:
        base = base_url.rstrip("/")
        own = self.artefacts(arch) or self.artefacts()
        assert own is not None
        return {
            "base_url": base,
            "kernel_url": f"{base}/artefacts/{own.image}/{own.kernel}",
            "initrd_url": f"{base}/artefacts/{own.image}/{own.initrd}",
            "image": own.image,
            "role": self.role,
            "profile": self.name,
            "mac": mac,
        }


@dataclass(frozen=True, slots=True)
class Profiles:
    profiles: Mapping[str, Profile]
    machines: Mapping[str, str]  # MAC -> profile name (groups already flattened in)
    default: str | None = None

    def for_mac(self, mac: str) -> Profile | None:
        """The machine's own profile, else its group's, else the default (or None)."""
        name = self.machines.get(mac, self.default)
        return self.profiles[name] if name is not None else None

    @classmethod
    def load(cls, path: Path) -> Profiles:
        data = read_yaml(path)
        try:
            return cls.parse(data, path.parent)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}") from exc

    @classmethod
    def parse(cls, data: Any, base_dir: Path) -> Profiles:
        doc = _mapping(data, "profiles file")
        _no_unknown(doc, {"default", "profiles", "groups", "machines"}, "")
        profiles: dict[str, Profile] = {}
        for name, raw in _mapping(doc.get("profiles"), "profiles").items():
            profiles[str(name)] = _profile(str(name), _mapping(raw, f"profiles.{name}"), base_dir)
        if not profiles:
            raise ConfigError("profiles: at least one profile is required")

        def known(name: Any, where: str) -> str:
            if str(name) not in profiles:
                raise ConfigError(f"{where}: no profile named {name!r}")
            return str(name)

        machines: dict[str, str] = {}
        for group, raw in _mapping(doc.get("groups") or {}, "groups").items():
            g = _mapping(raw, f"groups.{group}")
            _no_unknown(g, {"profile", "macs"}, f"groups.{group}.")
            profile = known(g.get("profile"), f"groups.{group}.profile")
            for mac in g.get("macs") or []:
                machines[_mac(mac, f"groups.{group}.macs")] = profile
        for mac, name in _mapping(doc.get("machines") or {}, "machines").items():
            machines[_mac(mac, "machines")] = known(name, f"machines.{mac}")
        default = doc.get("default")
        return cls(profiles, machines, known(default, "default") if default else None)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _no_unknown(doc: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key")


def _mac(value: Any, where: str) -> str:
    try:
        return normalise_mac(str(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _path_part(value: Any, where: str) -> str:
    text = str(value)
    if not _SAFE_PATH.match(text) or any(p in (".", "..") for p in text.split("/")):
        raise ConfigError(f"{where}: {text!r} must be a relative path without '..'")
    return text


def _profile(name: str, raw: Mapping[str, Any], base_dir: Path) -> Profile:
    where = f"profiles.{name}"
    _no_unknown(raw, {"image", "role", "cmdline", "template", "kernel", "initrd", "arm64"},
                f"{where}.")  # fmt: skip
    if "image" not in raw:
        raise ConfigError(f"{where}.image: required")
    template_name = str(raw.get("template", "templates/default.ipxe"))
    template_path = base_dir / template_name
    try:
        template = template_path.read_text()
    except OSError as exc:
        raise ConfigError(f"{where}.template: cannot read {template_path}: {exc.strerror}") from exc
    if not template.startswith("#!ipxe"):
        raise ConfigError(f"{where}.template: {template_path} does not start with #!ipxe")
    for placeholder in _PLACEHOLDER.findall(template):
        if placeholder not in PLACEHOLDERS:
            raise ConfigError(f"{where}.template: unknown placeholder {{{{{placeholder}}}}}")
    cmdline = _cmdline(raw.get("cmdline", ""), f"{where}.cmdline")
    arm64 = None
    if raw.get("arm64") is not None:
        arm64 = _arm64(_mapping(raw["arm64"], f"{where}.arm64"), cmdline, f"{where}.arm64")
    return Profile(
        name=name,
        image=_path_part(raw["image"], f"{where}.image"),
        role=str(raw.get("role", name)),
        cmdline=cmdline,
        template=template,
        kernel=_path_part(raw.get("kernel", "vmlinuz"), f"{where}.kernel"),
        initrd=_path_part(raw.get("initrd", "initrd"), f"{where}.initrd"),
        arm64=arm64,
    )


def _cmdline(value: Any, where: str) -> str:
    cmdline = str(value)
    if "\n" in cmdline:
        raise ConfigError(f"{where}: must be one line")
    if "hatchery.seed=" in cmdline:
        raise ConfigError(
            f"{where}: remove hatchery.seed=; the boot service adds it itself, with a "
            "single-use token, for the machine holding the birth lease only"
        )
    return cmdline


def _arm64(raw: Mapping[str, Any], cmdline: str, where: str) -> Artefacts:
    """A profile's ``arm64:`` artefacts; the command line defaults to the profile's."""
    _no_unknown(raw, {"image", "kernel", "initrd", "cmdline"}, f"{where}.")
    if "image" not in raw:
        raise ConfigError(f"{where}.image: required (the folder of the arm64 kernel and initrd)")
    return Artefacts(
        image=_path_part(raw["image"], f"{where}.image"),
        kernel=_path_part(raw.get("kernel", "Image"), f"{where}.kernel"),
        initrd=_path_part(raw.get("initrd", "initrd"), f"{where}.initrd"),
        cmdline=_cmdline(raw.get("cmdline", cmdline), f"{where}.cmdline"),
    )
