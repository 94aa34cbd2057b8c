"""The OCI runtime configuration (``config.json``) a container VM hands to crun.

Made by the agent, not in the VM, from the image's configuration and the VM's request, so
what the container is allowed is decided in one reviewed place:

- its own mount, PID, UTS and IPC namespaces; the network is the VM's (the VM is the
  tenant's isolation boundary), with the metadata address blocked by the VM's init before
  the container starts;
- Docker's default capabilities without ``CAP_NET_RAW`` (raw and packet sockets would
  reach the metadata service past the blocked route) and without ``CAP_NET_ADMIN`` (it could
  lift the block); ``no_new_privs``; a fresh ``/dev`` and ``/proc``, ``/sys`` read-only;
- environment: the image's, then ``--env`` (later wins), never the VM's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from hatchery.containers.oci import ImageConfig, ImageRefused

CAPABILITIES = (
    "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_MKNOD", "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID",
    "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
)  # fmt: skip
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_ENV_VALUE = 4096
_USER = re.compile(r"(\d{1,9})(?::(\d{1,9}))?")


def check_env(items: Mapping[str, str]) -> dict[str, str]:
    """``--env`` as given by a tenant: names of letters, digits and ``_``, values without
    NUL and at most 4 KiB."""
    out: dict[str, str] = {}
    for name, value in items.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise ImageRefused(f"environment name {name!r} is not a valid variable name")
        if not isinstance(value, str) or "\0" in value or len(value) > MAX_ENV_VALUE:
            raise ImageRefused(f"environment value of {name} has a NUL or is over "
                               f"{MAX_ENV_VALUE} characters")  # fmt: skip
        out[name] = value
    return out


def _user(user: str) -> dict[str, int]:
    if not user:
        return {"uid": 0, "gid": 0}
    match = _USER.fullmatch(user)
    if match is None:
        raise ImageRefused(f"the image's User {user!r} is a name: only numeric uid[:gid] is "
                           "supported (the VM does not read the image's /etc/passwd)")  # fmt: skip
    uid = int(match.group(1))
    return {"uid": uid, "gid": int(match.group(2) or uid)}


def runtime_config(image: ImageConfig, hostname: str, env: Mapping[str, str] = {},
                   args: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """The ``config.json`` of the bundle: the image's command (``args`` replaces Cmd)."""
    argv = [*image.entrypoint, *(args or image.cmd)]
    if not argv:
        raise ImageRefused("the image names no command (no Entrypoint and no Cmd)")
    merged: dict[str, str] = {}
    for item in image.env:
        name, sep, value = item.partition("=")
        if sep and ENV_NAME.fullmatch(name):
            merged[name] = value
    merged.update(check_env(env))
    merged.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    caps = list(CAPABILITIES)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": _user(image.user),
            "args": argv,
            "env": [f"{k}={v}" for k, v in merged.items()],
            "cwd": image.working_dir if image.working_dir.startswith("/") else "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }  # fmt: skip
