"""The pool at 65 000 addresses: correct, and no operation's work grows with the pool.

No timings (they belong in bench/): the work is counted. Python lines executed per
operation (``sys.settrace``) must be the same for 65 000 addresses as for 100, which no scan
or sort of the pool in Python can pass; the heap and dict behind them are C and O(log N) or
O(1). On disk, the statement a change runs must search a primary key, never scan, and the
bytes a change writes (``/proc/self/io``) are a few pages, not the pool.
"""

from __future__ import annotations

import ipaddress
import shutil
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from hatchery.addresses import SET_OWNER, AddressPool, Subnet, mac_for

IP = ipaddress.IPv4Address
BIG = 65_000
NET = Subnet("br0", ipaddress.IPv4Network("10.0.0.0/16"), IP("10.0.0.1"), (IP("10.0.0.1"),))
FIRST = int(IP("10.0.0.2"))


def build(path: Path, n: int) -> None:
    with AddressPool(path) as pool:
        pool.add_subnet(NET)
        assert pool.add_range(IP(FIRST), IP(FIRST + n - 1)) == n


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A closed pool database of 100 and one of 65 000 addresses, built once."""
    root = tmp_path_factory.mktemp("built")
    paths = {}
    for n in (100, BIG):
        (root / str(n)).mkdir()
        paths[n] = root / str(n) / "pool.db"
        build(paths[n], n)
    return paths


def open_copy(built: dict[int, Path], n: int, where: Path) -> AddressPool:
    where.mkdir()
    shutil.copy(built[n], where / "pool.db")
    return AddressPool(where / "pool.db")


@pytest.fixture
def big(built: dict[int, Path], tmp_path: Path) -> Iterator[AddressPool]:
    with open_copy(built, BIG, tmp_path / "big") as pool:
        yield pool


def lines_run(fn: Callable[[], object]) -> int:
    """Python lines ``fn`` executes, in every module: a count of work, not a timing."""
    count = 0

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def wchar() -> int:
    """Bytes this process has passed to write(2) and friends so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def test_correct_at_65000(big: AddressPool, tmp_path: Path) -> None:
    assert big.stats().total == BIG and big.stats().free == BIG
    got = [int(big.allocate(f"vm{k}").ip) for k in range(900)]
    assert got == list(range(FIRST, FIRST + 900)), "not the lowest free, in order"
    for k in range(0, 900, 3):  # give back every third, then they come back lowest first
        big.release(IP(FIRST + k), f"vm{k}")
    again = [int(big.allocate(f"again{k}").ip) for k in range(400)]
    assert again == list(range(FIRST, FIRST + 900, 3)) + list(range(FIRST + 900, FIRST + 1000))
    assert big.stats().free == BIG - 1000
    for ip in range(FIRST, FIRST + BIG, 997):  # lookups across the whole pool
        found = big.lookup_mac(mac_for(IP(ip)))
        assert found is not None and int(found[0].ip) == ip
    big.close()
    with AddressPool(tmp_path / "big" / "pool.db") as again_pool:  # and all of it persisted
        assert again_pool.stats().free == BIG - 1000
        listed = again_pool.listing()
        assert len(listed) == BIG and listed[900]["owner"] == "again300"


def test_no_operation_does_more_work_on_a_bigger_pool(
    built: dict[int, Path], tmp_path: Path
) -> None:
    def ops(pool: AddressPool, n: int) -> dict[str, Callable[[], object]]:
        last = IP(FIRST + n - 1)
        return {
            "allocate": lambda: pool.allocate("a"),
            "allocate on a bridge": lambda: pool.allocate("b", bridge="br0"),
            "lookup a MAC": lambda: pool.lookup_mac(mac_for(last)),
            "claim out of order": lambda: pool.claim(last, "c"),
            "release": lambda: pool.release(IP(FIRST), "a"),
            "allocate after a claim": lambda: pool.allocate("d"),
            "add one address": lambda: pool.add_addresses([(IP(FIRST + n), None)]),
            "stats": pool.stats,
        }

    with (
        open_copy(built, 100, tmp_path / "small") as small,
        open_copy(built, BIG, tmp_path / "big") as big,
    ):
        work_small = {name: lines_run(op) for name, op in ops(small, 100).items()}
        work_big = {name: lines_run(op) for name, op in ops(big, BIG).items()}
    assert all(count > 0 for count in work_small.values()), "the tracer saw nothing"
    assert work_big == work_small, "an operation's work grows with the pool"


def test_stale_heap_entries_cost_one_pop_each_once(built: dict[int, Path], tmp_path: Path) -> None:
    """A claim out of order leaves a stale heap entry, dropped once when it reaches the top;
    an address released, claimed and released again is never queued twice."""
    with open_copy(built, BIG, tmp_path / "clean") as pool:
        clean = lines_run(lambda: [pool.allocate(f"x{k}") for k in range(600)])
    with open_copy(built, BIG, tmp_path / "churned") as pool:
        for _ in range(2):
            for k in range(0, 600, 2):
                pool.claim(IP(FIRST + k), "c")
            for k in range(0, 600, 2):
                pool.release(IP(FIRST + k), "c")
        churned = lines_run(lambda: [pool.allocate(f"x{k}") for k in range(600)])
        assert churned == clean, "an address was queued twice"
        for k in range(600, 1200, 2):
            pool.claim(IP(FIRST + k), "c")  # 300 stale entries among the next 600
        past_stale = lines_run(lambda: [pool.allocate(f"y{k}") for k in range(300)])
        assert [int(IP(e["ip"])) for e in pool.listing() if e["owner"] == "y299"] == [FIRST + 1199]
    # 300 allocations and 300 stale pops; a rescan per allocation would be 300 x 600 steps
    assert past_stale < clean, "allocation past stale entries rescans"


def test_a_change_touches_one_row_through_its_key(built: dict[int, Path]) -> None:
    db = sqlite3.connect(built[BIG])
    try:
        plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {SET_OWNER}", (None, 0)))
    finally:
        db.close()
    assert "USING INTEGER PRIMARY KEY" in plan and "SCAN" not in plan, plan


def test_a_change_writes_pages_not_the_pool(big: AddressPool) -> None:
    before = wchar()
    for k in range(100):
        big.allocate(f"vm{k}")
        big.claim(IP(FIRST + 30_000 + k), f"c{k}")
    for k in range(0, 100, 2):
        big.release(IP(FIRST + k), f"vm{k}")
    written = wchar() - before
    changes = 250
    as_json = BIG * 70  # the whole pool as the old pool.json, rewritten per change
    assert written < changes * 32 * 1024, f"{written / changes:.0f} bytes per change"
    assert written < as_json, "200 changes wrote more than one rewrite of the whole pool"
