"""A second copy of each bridge's VM port rules, which a flush of the ruleset cannot take.

Why: the rules live in ordinary nft tables (``ruleset.py``), and Debian's ``nftables.service``
(reload, restart, stop) or an operator's ``nft flush ruleset`` deletes every table. The
keeper (``keeper.py``) puts ours back, but only once the notification has come, the burst is
over and ``nft`` has run: for that while a VM's spoofed ARP reply, a rogue DHCP answer or a
router advertisement went through, and an ARP cache poisoned then stays poisoned for minutes.

A table with the ``owner`` flag (kernel 5.12 and later, nft 1.0.6 here) belongs to the
netlink socket that made it: no other process may change or delete it, and ``nft flush
ruleset`` passes it by. It goes when that socket closes, that is with the agent. So the
agent keeps both: the ordinary tables, which outlive the agent and protect its VMs while it
restarts, and the held ones (``render(held=True)``: the same rules), which outlive any
flush. One event takes at most one copy: a flush the ordinary one (the keeper puts it
back), the agent's exit the held one (the next agent makes its own).

The socket must outlive each command, so the ``nft`` program (one socket per run) cannot
hold it: the agent talks to libnftables, nft's own library, in-process through ``ctypes``
(one session for the process, one command at a time). libnftables opens its socket without
close-on-exec, so it is made non-inheritable at once: a child (a VM's QEMU) holding it would
be a root socket to the firewall in that child's hands, and would keep the tables alive
after the agent, where the next agent could not replace them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from pathlib import Path

from hatchery.errors import HatcheryError

NETLINK_NETFILTER = 12


class HeldTablesError(HatcheryError):
    """libnftables is missing, or it refused a held table (a kernel without ``owner``)."""


def _socket_fds() -> set[int]:
    found = set()
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(entry).startswith("socket:"):
                found.add(int(entry.name))
        except (OSError, ValueError):
            continue  # closed meanwhile, or the listing's own descriptor
    return found


def _is_netfilter_netlink(fd: int) -> bool:
    try:  # a socket made from a descriptor reads its family and protocol from the kernel
        with socket.socket(fileno=os.dup(fd)) as probe:
            return probe.family == socket.AF_NETLINK and probe.proto == NETLINK_NETFILTER
    except OSError:
        return False


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        hint = "install libnftables1 (the nftables package depends on it)"
        raise HeldTablesError(f"cannot load libnftables ({name}): {exc}", hint=hint) from exc
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


class HeldSession:
    """The process's own libnftables session: the tables its scripts mark ``flags owner``
    are this session's, until ``close`` (or the process's end). Blocking: call it from a
    worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._ctx: int | None = None

    def _open(self) -> tuple[ctypes.CDLL, int]:
        if self._lib is None:
            self._lib = _load()
        if self._ctx is None:
            before = _socket_fds()
            ctx = self._lib.nft_ctx_new(0)
            if not ctx:
                raise HeldTablesError("libnftables could not make a session")
            for fd in _socket_fds() - before:
                if _is_netfilter_netlink(fd):
                    os.set_inheritable(fd, False)
            self._lib.nft_ctx_buffer_output(ctx)
            self._lib.nft_ctx_buffer_error(ctx)
            self._ctx = ctx
        return self._lib, self._ctx

    def run(self, script: str) -> None:
        """Run an nft script as one transaction.

        :raise HeldTablesError: libnftables is missing or refused the script (its words).
        """
        with self._lock:
            lib, ctx = self._open()
            status = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            if status != 0:
                said = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
                raise HeldTablesError(f"held nft tables refused: {said.strip()[-1000:]}")

    def close(self) -> None:
        """End the session: the kernel deletes every table it holds."""
        with self._lock:
            if self._lib is not None and self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


#: One per process: the held tables of every bridge belong to it.
SESSION = HeldSession()
