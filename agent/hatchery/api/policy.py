"""Who may do what: groups from the client certificate mapped to permissions.

Permissions are ``<area>.<verb>`` strings (``vm.read``, ``vm.manage``, ``pool.manage``,
``upgrade.manage``), or ``<area>.<part>.<verb>`` for a part of an area
(``node.logs.read``). In a pattern, ``*`` alone is every permission; a ``*`` segment stands
for exactly one segment (``vm.*``, ``*.read``), so ``*.read`` does not cover
``node.logs.read``: the node's logs show every tenant's VM names and activity, and are
granted by name (``ops``), not with "read everything" (``reader``). A plain pattern grants
the permission on everything of its area.

A VM has an owner group. The pattern ``vm.manage:own`` (or ``vm.read:own``, ``vm.*:own``)
grants the permission only on the VMs owned by *the group the grant is listed under*: under
``web`` it means "on VMs whose ``owner_group`` is ``web``", creating one included. That is
the only way a group reaches its own VMs: nothing a request sends (an ``owner_group`` in a
body) grants anything; the body only names which group's VM the caller wants to create, and
the policy decides whether the caller holds a grant for that group.

``other_groups`` holds the patterns of every certificate group the policy does not list: in
the default policy, each tenant group (any group but ``admin``, ``ops``, ``reader`` and
``node``) may read and manage its own VMs and nothing else. The listed groups get only what
their entry says, so a ``reader`` or ``node`` certificate cannot create a VM "for" its own
group. A policy file replaces the whole default; leave ``other_groups`` out of it to give
unlisted groups nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hatchery.errors import ConfigError
from hatchery.pki import Identity

#: The suffix of a grant that holds only on objects owned by the grant's group.
OWN = ":own"
_SEGMENT = r"(\*|[a-z][a-z0-9_]*)"
_PATTERN = re.compile(rf"\*|{_SEGMENT}(\.{_SEGMENT}){{1,2}}")

DEFAULT_POLICY: dict[str, tuple[str, ...]] = {
    "admin": ("*",),
    "ops": ("vm.*", "pool.read", "health.read", "upgrade.read", "node.logs.read"),
    "reader": ("*.read",),
    # Agents: their certificates carry this group, so peers let them fetch images and health.
    # Node-to-node work only: a node certificate never creates, reads or destroys a VM.
    "node": ("images.read", "health.read"),
}
#: Every group not listed above: a tenant, which reads and manages only the VMs it owns.
DEFAULT_OTHER_GROUPS: tuple[str, ...] = ("vm.read" + OWN, "vm.manage" + OWN, "vm.console" + OWN)


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a caller holds one permission: on everything, or on the objects owned by
    ``groups`` (from scoped grants). Falsy when it holds nowhere."""

    everything: bool = False
    groups: frozenset[str] = frozenset()

    def covers(self, owner_group: str | None) -> bool:
        """Whether the permission holds on an object owned by ``owner_group`` (None: an
        object without an owner, or no object at all: only an unscoped grant covers it)."""
        return self.everything or (owner_group is not None and owner_group in self.groups)

    def __bool__(self) -> bool:
        return self.everything or bool(self.groups)


def _matches(pattern: str, permission: str) -> bool:
    """``*`` matches everything; otherwise segment by segment, a ``*`` segment any one."""
    if pattern == "*" or pattern == permission:
        return True
    wanted, given = pattern.split("."), permission.split(".")
    return len(wanted) == len(given) and all(
        w in ("*", g) for w, g in zip(wanted, given, strict=True)
    )


def check_pattern(pattern: str, where: str) -> str:
    """A pattern the policy understands, or a ``ConfigError`` naming ``where``: a typo in a
    policy must not silently grant nothing (or, worse, more than meant)."""
    base, scoped = (pattern[: -len(OWN)], True) if pattern.endswith(OWN) else (pattern, False)
    if _PATTERN.fullmatch(base) is None:
        raise ConfigError(
            f"{where}: {pattern!r} is not a permission pattern",
            hint="area.verb, area.part.verb, area.*, *.verb or *, optionally followed by :own "
            "for vm.* grants",
        )
    if scoped and not base.startswith("vm."):
        raise ConfigError(f"{where}: {pattern!r}: only vm permissions can be scoped to :own "
                          "(VMs are the only objects with an owner group)")  # fmt: skip
    return pattern


@dataclass(frozen=True, slots=True)
class Policy:
    groups: Mapping[str, tuple[str, ...]]
    other_groups: tuple[str, ...] = field(default=())

    def _patterns(self, group: str) -> Iterable[str]:
        return self.groups[group] if group in self.groups else self.other_groups

    def scope(self, who: Identity, permission: str) -> Scope:
        """Where ``who`` holds ``permission``, from the grants of each of its groups."""
        everything, owned = False, set()
        for group in who.groups:
            for pattern in self._patterns(group):
                if pattern.endswith(OWN):
                    if _matches(pattern[: -len(OWN)], permission):
                        owned.add(group)
                elif _matches(pattern, permission):
                    everything = True
        return Scope(everything, frozenset(owned))

    def allows(self, who: Identity, permission: str, owner_group: str | None = None) -> bool:
        """Whether ``who`` holds ``permission`` on an object of ``owner_group`` (None: on
        everything, which only an unscoped grant gives)."""
        return self.scope(who, permission).covers(owner_group)


def default_policy() -> Policy:
    return Policy(DEFAULT_POLICY, DEFAULT_OTHER_GROUPS)


def _patterns(value: object, where: str, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"policy {path}: {where}: expected a list of permissions")
    try:
        return tuple(check_pattern(p, where) for p in value)
    except ConfigError as exc:
        raise ConfigError(f"policy {path}: {exc.message}", hint=exc.hint) from exc


def load_policy(path: Path | None) -> Policy:
    """The policy in ``path`` (YAML: ``groups: {group: [pattern]}``, optionally
    ``other_groups: [pattern]``), or the default policy without a path."""
    if path is None:
        return default_policy()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"policy {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("groups"), dict):
        raise ConfigError(f"policy {path}: expected a mapping 'groups: {{group: [permission]}}'")
    unknown = sorted(set(data) - {"groups", "other_groups"})
    if unknown:
        raise ConfigError(f"policy {path}: {unknown[0]}: unknown key")
    groups = {
        str(group): _patterns(perms, f"groups.{group}", path)
        for group, perms in data["groups"].items()
    }
    others = _patterns(data.get("other_groups", []), "other_groups", path)
    return Policy(groups, others)
