"""The held copy's libnftables session (``metadata/held.py``), in a scratch namespace.

Real kernel, real libnftables, real ``nft``: a table the session holds outlives a flush of
the ruleset, refuses another process's delete, and goes when the session's process ends,
even while a child it started (as the agent starts QEMU) still runs. Had the child
inherited the session's netlink socket, the tables would have lived on in its hands,
where the next agent could not replace them.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

OWNER = """
import subprocess, time
from hatchery.metadata.held import SESSION
SESSION.run("table inet hatcheryheld_t { flags owner; }\\n"
            "table inet hatcheryheld_t {\\n  flags owner\\n  chain c {\\n"
            "    type filter hook input priority 0;\\n  }\\n}\\n")
child = subprocess.Popen(["sleep", "60"], close_fds=False)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def scratch_ns(require_root: None, require_tool: Callable[[str], str]) -> Iterator[str]:
    require_tool("nft")
    name = f"hheld-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _nft(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *argv], capture_output=True,
                          text=True, check=False)  # fmt: skip


def _tables(ns: str) -> str:
    return _nft(ns, "list", "tables").stdout


def test_a_held_table_outlives_a_flush_and_dies_with_its_process(scratch_ns: str) -> None:
    owner = subprocess.Popen(["ip", "netns", "exec", scratch_ns, sys.executable, "-c", OWNER],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert owner.stdout is not None
    child = int(owner.stdout.readline())
    try:
        assert "table inet hatcheryheld_t" in _tables(scratch_ns)
        assert _nft(scratch_ns, "flush", "ruleset").returncode == 0
        assert "table inet hatcheryheld_t" in _tables(scratch_ns)
        refused = _nft(scratch_ns, "delete", "table", "inet", "hatcheryheld_t")
        assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    finally:
        owner.kill()
        owner.wait()
    try:
        deadline = time.monotonic() + 10  # a deadline to fail by: the kernel frees at once
        while "hatcheryheld_t" in _tables(scratch_ns):
            assert time.monotonic() < deadline, "the held table outlived its session's process"
            time.sleep(0.05)
        assert subprocess.run(["kill", "-0", str(child)], check=False).returncode == 0
    finally:
        subprocess.run(["kill", str(child)], check=False)
