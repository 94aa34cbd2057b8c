from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hatchery.addresses import AddressPool, PoolError, Subnet, mac_for

IP = ipaddress.IPv4Address
NET = Subnet("br0", ipaddress.IPv4Network("10.0.0.0/24"), IP("10.0.0.1"), (IP("10.0.0.1"),))


def make_pool(tmp_path: Path, start: str = "10.0.0.10", end: str = "10.0.0.12") -> AddressPool:
    pool = AddressPool(tmp_path / "pool.json")
    pool.add_subnet(NET)
    pool.add_range(IP(start), IP(end))
    return pool


def test_allocate_release_and_persist(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    a = pool.allocate("vm1")
    assert a.ip == IP("10.0.0.10") and a.mac == mac_for(a.ip) == "52:54:0a:00:00:0a"
    again = AddressPool(tmp_path / "pool.json")  # a restart
    b = again.allocate("vm2")
    assert b.ip == IP("10.0.0.11"), "a restarted pool handed out an address in use"
    again.release(a.ip, "vm1")
    assert AddressPool(tmp_path / "pool.json").stats().free == 2


def test_empty_pool_is_refused_clearly(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, "10.0.0.10", "10.0.0.10")
    pool.allocate("vm1")
    with pytest.raises(PoolError, match="no free address"):
        pool.allocate("vm2")
    with pytest.raises(PoolError, match="on bridge br9"):
        pool.allocate("vm2", bridge="br9")


def test_release_by_another_owner_does_nothing(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    a = pool.allocate("vm1")
    pool.release(a.ip, "intruder")
    assert pool.stats().free == 2


def test_bad_additions_are_refused(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    with pytest.raises(PoolError, match="no known subnet"):
        pool.add_addresses([(IP("192.168.1.5"), None)])
    with pytest.raises(PoolError, match="gateway"):
        pool.add_addresses([(IP("10.0.0.1"), None)])
    with pytest.raises(PoolError, match="broadcast"):
        pool.add_addresses([(IP("10.0.0.255"), None)])
    with pytest.raises(PoolError, match="multicast"):
        pool.add_addresses([(IP("10.0.0.50"), "01:00:5e:00:00:01")])
    with pytest.raises(PoolError, match="already in the pool"):
        pool.add_addresses([(IP("10.0.0.51"), mac_for(IP("10.0.0.10")))])
    with pytest.raises(PoolError, match="overlaps"):
        pool.add_subnet(Subnet("br1", ipaddress.IPv4Network("10.0.0.0/25"), None, ()))
    assert pool.stats().total == 3


def test_adding_twice_is_idempotent(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    assert pool.add_subnet(NET) is False
    assert pool.add_range(IP("10.0.0.10"), IP("10.0.0.12")) == 0


def test_corrupt_pool_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "pool.json").write_text("[1, 2")
    assert AddressPool(tmp_path / "pool.json").stats().total == 0
    assert any(p.name.startswith("pool.json.corrupt-") for p in tmp_path.iterdir())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["alloc", "free"]), max_size=40))
def test_never_the_same_address_twice(
    tmp_path_factory: pytest.TempPathFactory, ops: list[str]
) -> None:
    pool = make_pool(tmp_path_factory.mktemp("pool"), "10.0.0.10", "10.0.0.14")
    held: dict[str, IP] = {}
    for i, op in enumerate(ops):
        if op == "alloc":
            try:
                held[f"vm{i}"] = pool.allocate(f"vm{i}").ip
            except PoolError:
                assert len(held) == 5
        elif held:
            owner = sorted(held)[0]
            pool.release(held.pop(owner), owner)
        assert len(set(held.values())) == len(held)
        assert pool.stats().free == 5 - len(held)
