"""The address pool's behaviour: allocation order, refusals, persistence across restarts, and
the indexed pool checked against the obvious one (a sorted scan) under random operations."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hatchery.addresses import AddressPool, PoolError, Subnet, mac_for

IP = ipaddress.IPv4Address
NET = Subnet("br0", ipaddress.IPv4Network("10.0.0.0/24"), IP("10.0.0.1"), (IP("10.0.0.1"),))
NET1 = Subnet("br1", ipaddress.IPv4Network("10.1.0.0/24"), None, ())


def make_pool(tmp_path: Path, start: str = "10.0.0.10", end: str = "10.0.0.12") -> AddressPool:
    pool = AddressPool(tmp_path / "pool.db")
    pool.add_subnet(NET)
    pool.add_range(IP(start), IP(end))
    return pool


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[AddressPool]:
    with make_pool(tmp_path) as p:
        yield p


def test_allocate_release_and_persist(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    a = pool.allocate("vm1")
    assert a.ip == IP("10.0.0.10") and a.mac == mac_for(a.ip) == "52:54:0a:00:00:0a"
    pool.close()
    again = AddressPool(tmp_path / "pool.db")  # a restart
    b = again.allocate("vm2")
    assert b.ip == IP("10.0.0.11"), "a restarted pool handed out an address in use"
    again.release(a.ip, "vm1")
    again.close()
    with AddressPool(tmp_path / "pool.db") as third:
        assert third.stats().free == 2
        assert third.subnets() == [NET]
        assert [(e["ip"], e["owner"]) for e in third.listing()] == [
            ("10.0.0.10", None), ("10.0.0.11", "vm2"), ("10.0.0.12", None),
        ]  # fmt: skip


def test_empty_pool_is_refused_clearly(tmp_path: Path) -> None:
    with make_pool(tmp_path, "10.0.0.10", "10.0.0.10") as pool:
        pool.allocate("vm1")
        with pytest.raises(PoolError, match="no free address"):
            pool.allocate("vm2")
        with pytest.raises(PoolError, match="on bridge br9"):
            pool.allocate("vm2", bridge="br9")


def test_release_by_another_owner_does_nothing(pool: AddressPool) -> None:
    a = pool.allocate("vm1")
    pool.release(a.ip, "intruder")
    pool.release(IP("10.0.0.99"), "vm1")  # not in the pool at all
    assert pool.stats().free == 2


def test_bad_additions_are_refused(pool: AddressPool) -> None:
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
    with pytest.raises(PoolError, match="already in the pool"):  # one MAC twice in one call
        pool.add_addresses([(IP("10.0.0.51"), "52:54:00:00:00:01"),
                            (IP("10.0.0.52"), "52:54:00:00:00:01")])  # fmt: skip
    with pytest.raises(PoolError, match="overlaps"):
        pool.add_subnet(Subnet("br1", ipaddress.IPv4Network("10.0.0.0/25"), None, ()))
    with pytest.raises(PoolError, match="outside"):
        pool.add_subnet(Subnet("br1", ipaddress.IPv4Network("10.9.0.0/24"), IP("10.8.0.1"), ()))
    assert pool.stats().total == 3, "a refused batch added some of its addresses"


def test_adding_twice_is_idempotent(pool: AddressPool) -> None:
    assert pool.add_subnet(NET) is False
    assert pool.add_range(IP("10.0.0.10"), IP("10.0.0.12")) == 0
    assert pool.add_range(IP("10.0.0.10"), IP("10.0.0.13")) == 1


def test_lookup_by_mac_any_spelling(pool: AddressPool) -> None:
    a = pool.allocate("vm1")
    found = pool.lookup_mac("52-54-0A-00-00-0A")
    assert found is not None and found[0] == a and found[1] == "vm1"
    free = pool.lookup_mac(mac_for(IP("10.0.0.11")))
    assert free is not None and free[1] is None
    assert pool.lookup_mac("52:54:00:00:00:99") is None
    with pytest.raises(PoolError, match="bad MAC"):
        pool.lookup_mac("nonsense")


def test_claim_is_idempotent_and_exclusive(pool: AddressPool) -> None:
    assert pool.claim(IP("10.0.0.11"), "vm1").ip == IP("10.0.0.11")
    assert pool.claim(IP("10.0.0.11"), "vm1").ip == IP("10.0.0.11")
    with pytest.raises(PoolError, match="held by vm1"):
        pool.claim(IP("10.0.0.11"), "vm2")
    with pytest.raises(PoolError, match="not in the pool"):
        pool.claim(IP("10.0.0.99"), "vm2")
    assert [pool.allocate(f"x{i}").ip for i in range(2)] == [IP("10.0.0.10"), IP("10.0.0.12")]


def test_allocation_per_bridge_and_lowest_overall(tmp_path: Path) -> None:
    with make_pool(tmp_path, "10.0.0.200", "10.0.0.201") as pool:
        pool.add_subnet(NET1)
        pool.add_range(IP("10.1.0.5"), IP("10.1.0.6"))
        assert pool.allocate("a", bridge="br1").ip == IP("10.1.0.5")
        assert pool.allocate("b").ip == IP("10.0.0.200")
        assert pool.allocate("c", bridge="br0").ip == IP("10.0.0.201")
        assert pool.allocate("d").ip == IP("10.1.0.6")
        for bridge in ("br0", "br1"):
            with pytest.raises(PoolError, match=f"on bridge {bridge}"):
                pool.allocate("e", bridge=bridge)


def test_a_json_path_is_a_mistake_named_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"pass pool\.db"):
        AddressPool(tmp_path / "pool.json")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["alloc", "free"]), max_size=40))
def test_never_the_same_address_twice(
    tmp_path_factory: pytest.TempPathFactory, ops: list[str]
) -> None:
    with make_pool(tmp_path_factory.mktemp("pool"), "10.0.0.10", "10.0.0.14") as pool:
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


# --- the indexed pool against the obvious one ------------------------------------------------
class ScanPool:
    """The reference: the first pool's algorithms (a sorted scan per allocation), no disk."""

    def __init__(self, ranges: dict[str, range]) -> None:
        self.bridge = {ip: br for br, r in ranges.items() for ip in r}
        self.owner: dict[int, str | None] = dict.fromkeys(self.bridge)

    def allocate(self, owner: str, bridge: str | None) -> int | None:
        for ip in sorted(self.owner):
            if self.owner[ip] is None and bridge in (None, self.bridge[ip]):
                self.owner[ip] = owner
                return ip
        return None

    def claim(self, ip: int, owner: str) -> bool:
        if self.owner[ip] not in (None, owner):
            return False
        self.owner[ip] = owner
        return True

    def release(self, ip: int, owner: str) -> None:
        if self.owner[ip] == owner:
            self.owner[ip] = None


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.sampled_from([None, "br0", "br1"])),
        st.tuples(st.just("claim"), st.integers(0, 11)),
        st.tuples(st.just("release"), st.integers(0, 11)),
        st.tuples(st.just("restart"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(OPS, st.sampled_from(["a", "b", "c"]))
def test_index_agrees_with_a_sorted_scan(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, object]], who: str
) -> None:
    """Allocation, claims (out of order: stale heap entries), releases and restarts give
    exactly what the sorted scan gives; owners are drawn from a few names so that releases
    by the wrong owner happen too."""
    path = tmp_path_factory.mktemp("pool") / "pool.db"
    base0, base1 = int(IP("10.0.0.20")), int(IP("10.1.0.20"))
    ranges = {"br0": range(base0, base0 + 6), "br1": range(base1, base1 + 6)}
    addresses = [*ranges["br0"], *ranges["br1"]]
    pool = AddressPool(path)
    pool.add_subnet(NET)
    pool.add_subnet(NET1)
    for r in ranges.values():
        pool.add_range(IP(r[0]), IP(r[-1]))
    ref = ScanPool(ranges)
    try:
        for n, (op, arg) in enumerate(ops):
            owner = f"{who}{n % 3}"
            if op == "alloc":
                bridge = arg if isinstance(arg, str) else None
                want = ref.allocate(owner, bridge)
                if want is None:
                    with pytest.raises(PoolError, match="no free address"):
                        pool.allocate(owner, bridge)
                else:
                    assert int(pool.allocate(owner, bridge).ip) == want
            elif op == "claim":
                assert isinstance(arg, int)
                ip = addresses[arg]
                if ref.claim(ip, owner):
                    assert int(pool.claim(IP(ip), owner).ip) == ip
                else:
                    with pytest.raises(PoolError, match="held by"):
                        pool.claim(IP(ip), owner)
            elif op == "release":
                assert isinstance(arg, int)
                ref.release(addresses[arg], owner)
                pool.release(IP(addresses[arg]), owner)
            else:
                pool.close()
                pool = AddressPool(path)
            listed = {int(IP(e["ip"])): e["owner"] for e in pool.listing()}
            assert listed == ref.owner
            assert pool.stats().free == sum(1 for o in ref.owner.values() if o is None)
    finally:
        pool.close()
