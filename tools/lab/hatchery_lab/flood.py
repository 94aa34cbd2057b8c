"""Connection floods against a listener, and a second client's view of it (tests, bench).

Issue 14's attack: one client opens and holds many idle connections. ``hold`` opens them
(plain TCP, no request, no TLS: the cheapest thing an attacker can do), ``closed_by_server``
counts how many the server has closed since, and ``timed_healthz`` is the honest second
client: one ``GET /healthz`` over mutual TLS from another source address, timed.
Loopback only: any 127/8 address is this host, so two "clients" need no namespace.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import time
from collections.abc import Iterator

from hatchery.pki import client_context
from hatchery_lab.agent import Pki


def hold(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """``count`` idle connections from ``source`` to 127.0.0.1:``port``, left open."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
    except BaseException:
        release(held)
        raise
    return held


def release(held: list[socket.socket]) -> None:
    for sock in held:
        sock.close()


@contextlib.contextmanager
def holding(port: int, count: int, source: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    held = hold(port, count, source)
    try:
        yield held
    finally:
        release(held)


def closed_by_server(held: list[socket.socket], wait: float = 1.0) -> int:
    """How many of ``held`` the server closed (EOF or reset), waiting up to ``wait`` s."""
    poller = select.poll()
    for sock in held:
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    closed: set[int] = set()
    deadline = time.monotonic() + wait
    while len(closed) < len(held):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        events = poller.poll(left * 1000)
        if not events:
            break
        for fd, _ in events:
            closed.add(fd)
            poller.unregister(fd)
    return len(closed)


def timed_healthz(port: int, pki: Pki, source: str = "127.0.0.2", timeout: float = 10.0) -> float:
    """Seconds one ``GET /healthz`` took (connect, TLS handshake, request, answer) from
    ``source`` with an admin certificate. Raises if it failed or was not a 200."""
    pair = pki.client("admin", "admin")
    context = client_context(pki.ca, pair.cert, pair.key)
    started = time.perf_counter()
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout,
                                       source_address=(source, 0))  # fmt: skip
    try:
        conn.request("GET", "/healthz")
        answer = conn.getresponse()
        answer.read()
    finally:
        conn.close()
    if answer.status != 200:
        raise AssertionError(f"/healthz answered {answer.status}")
    return time.perf_counter() - started
