"""Who may do what: groups from the client certificate mapped to permissions.

Permissions are ``<area>.<verb>`` strings (``vm.read``, ``vm.manage``, ``pool.manage``,
``upgrade.manage``); a pattern may end in ``*``. A VM's ``owner_group`` may manage that VM
even without ``vm.manage``. The default policy below applies unless a policy file is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from hatchery.errors import ConfigError
from hatchery.pki import Identity

DEFAULT_POLICY: dict[str, tuple[str, ...]] = {
    "admin": ("*",),
    "ops": ("vm.*", "pool.read", "health.read", "upgrade.read"),
    "reader": ("*.read",),
    # Agents: their certificates carry this group, so peers let them fetch images and health.
    "node": ("images.read", "health.read"),
}


@dataclass(frozen=True, slots=True)
class Policy:
    groups: Mapping[str, tuple[str, ...]]

    def allows(self, who: Identity, permission: str, owner_group: str | None = None) -> bool:
        if owner_group is not None and owner_group in who.groups and permission.startswith("vm."):
            return True
        for group in who.groups:
            for pattern in self.groups.get(group, ()):
                if pattern == permission or (
                    pattern.endswith("*") and permission.startswith(pattern[:-1])
                ):
                    return True
                if pattern.startswith("*.") and permission.endswith(pattern[1:]):
                    return True
        return False


def load_policy(path: Path | None) -> Policy:
    if path is None:
        return Policy(DEFAULT_POLICY)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"policy {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("groups"), dict):
        raise ConfigError(f"policy {path}: expected a mapping 'groups: {{group: [permission]}}'")
    groups: dict[str, tuple[str, ...]] = {}
    for group, perms in data["groups"].items():
        if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
            raise ConfigError(f"policy {path}: groups.{group}: expected a list of permissions")
        groups[str(group)] = tuple(perms)
    return Policy(groups)
