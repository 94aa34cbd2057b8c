"""The address pool per operation: the indexed SQLite pool against the JSON pool it replaced.

Both pools run in one process on the same disk, each on its own state folder, at 1 000 and
65 000 addresses: allocate (persisted before it returns), release, and the DHCP lookup by
MAC. The replaced pool is the ``agent/hatchery/addresses.py`` of commit ``OLD`` loaded from
git, so the comparison needs a git checkout. Median of each operation's repeats.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.report import median, table, write_section
from hatchery import addresses

OLD = "bd71d70"  # the last commit with the JSON pool
REPO = Path(__file__).resolve().parent.parent
SIZES = (1_000, 65_000)
REPEATS = {1_000: 200, 65_000: 20}  # the JSON pool rewrites 5 MB per change at 65 000
IP = ipaddress.IPv4Address
FIRST = int(IP("10.0.0.2"))


def _old_module() -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{OLD}:agent/hatchery/addresses.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    spec = importlib.util.spec_from_loader("bench_old_addresses", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{OLD}:agent/hatchery/addresses.py", "exec"), module.__dict__)
    return module


def _per_op(fn: Callable[[int], object], repeats: int) -> float:
    """Median microseconds of ``fn(k)`` for k in range(repeats)."""
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        fn(k)
        times.append((time.perf_counter() - start) * 1e6)
    return median(times)


def _measure(module: Any, path: Path, n: int) -> dict[str, float]:
    pool = module.AddressPool(path)
    net = module.Subnet("br0", ipaddress.IPv4Network("10.0.0.0/16"), IP("10.0.0.1"), ())
    pool.add_subnet(net)
    pool.add_range(IP(FIRST), IP(FIRST + n - 1))
    repeats = REPEATS[n]
    held: list[Any] = []
    result = {
        "allocate": _per_op(lambda k: held.append(pool.allocate(f"vm{k}")), repeats),
        "release": _per_op(lambda k: pool.release(held[k].ip, f"vm{k}"), repeats),
        "DHCP lookup": _per_op(
            lambda k: pool.lookup_mac(module.mac_for(IP(FIRST + n - 1 - k))), repeats
        ),
    }
    if hasattr(pool, "close"):
        pool.close()
    return result


def run() -> None:
    old = _old_module()
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for n in SIZES:
            (tmp / f"old-{n}").mkdir()
            (tmp / f"new-{n}").mkdir()
            was = _measure(old, tmp / f"old-{n}" / "pool.json", n)
            now = _measure(addresses, tmp / f"new-{n}" / "pool.db", n)
            for op in was:
                rows.append([f"{n:,}", op, f"{was[op]:,.0f}", f"{now[op]:,.1f}",
                             f"{was[op] / now[op]:,.0f}x"])  # fmt: skip
    body = (
        "Per operation, in one process, on the temporary folder's disk: the JSON pool "
        f"of commit {OLD} (sort per allocation, scan per lookup, whole file rewritten and "
        "fsynced per change) against the indexed pool (heap and dicts in memory, one SQLite "
        "WAL transaction per change, `synchronous = FULL`). Median µs of "
        f"{REPEATS[SIZES[0]]} operations at {SIZES[0]:,} addresses, {REPEATS[SIZES[1]]} at "
        f"{SIZES[1]:,}.\n\n"
        + table(["addresses", "operation", "JSON pool µs", "indexed pool µs", "speed-up"], rows)
    )
    write_section("pool", "Address pool: per-operation cost, indexed SQLite vs JSON", body)
