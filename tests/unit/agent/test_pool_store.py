"""The pool on disk: SQLite, one transaction per change. A crash at any instant (a real
SIGKILL) leaves the old or the new state; a failed write changes nothing; an old pool.json is
converted without losing an entry; a damaged database is reported, never replaced."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hatchery import state
from hatchery.addresses import AddressPool, PoolError, PoolStats, Subnet, mac_for

IP = ipaddress.IPv4Address
NET = Subnet("br0", ipaddress.IPv4Network("10.0.0.0/24"), IP("10.0.0.1"), (IP("10.0.0.1"),))


def make_pool(path: Path, start: str = "10.0.0.10", end: str = "10.0.0.12") -> AddressPool:
    pool = AddressPool(path)
    pool.add_subnet(NET)
    pool.add_range(IP(start), IP(end))
    return pool


def owners(pool: AddressPool) -> dict[str, str | None]:
    return {e["ip"]: e["owner"] for e in pool.listing()}


def old_pool_json(addresses: list[dict[str, object]]) -> bytes:
    """A pool.json as the agent before the database wrote it."""
    value = {"subnets": [NET.to_json()], "addresses": addresses}
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


# --- files -----------------------------------------------------------------------------------
def test_the_database_is_private_in_wal_mode_and_alone(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool.db")
    pool.allocate("vm1")
    files = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert files == {"pool.db": 0o600, "pool.db-wal": 0o600}, "a -shm or a temporary is left"
    pool.close()
    pool.close()  # idempotent
    assert [p.name for p in tmp_path.iterdir()] == ["pool.db"], "close did not checkpoint"
    with pytest.raises(PoolError, match="closed"):
        pool.allocate("vm2")
    db = sqlite3.connect(tmp_path / "pool.db")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT ip, owner FROM addresses_text").fetchall() == [
        ("10.0.0.10", "vm1"), ("10.0.0.11", None), ("10.0.0.12", None),
    ]  # fmt: skip
    db.close()


def test_a_second_agent_on_the_same_pool_is_refused(tmp_path: Path) -> None:
    first = make_pool(tmp_path / "pool.db")
    with pytest.raises(state.StateError, match="in use by another process") as err:
        AddressPool(tmp_path / "pool.db", lock_timeout=0)
    assert err.value.hint is not None and "same state_dir" in err.value.hint
    first.allocate("vm1")  # the first one is unaffected
    first.close()
    with AddressPool(tmp_path / "pool.db", lock_timeout=0) as second:
        assert second.stats().free == 2


# --- a failed write changes nothing ------------------------------------------------------------
def sabotage(path: Path, trigger: str) -> None:
    """Make some writes fail inside SQLite, as a full or failing disk would, by a trigger."""
    db = sqlite3.connect(path)
    db.execute(trigger)
    db.commit()
    db.close()


def test_a_failed_write_leaves_memory_and_disk_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    with make_pool(path) as pool:
        pool.allocate("vm1")
    sabotage(path, "CREATE TRIGGER fail BEFORE UPDATE ON addresses "
                   "WHEN NEW.owner = 'doomed' OR OLD.owner = 'stuck' "
                   "BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END")  # fmt: skip
    with AddressPool(path) as pool:
        before = owners(pool)
        with pytest.raises(state.StateError, match="cannot write .*simulated write failure"):
            pool.allocate("doomed")
        assert owners(pool) == before and pool.stats().free == 2
        assert pool.allocate("vm2").ip == IP("10.0.0.11"), "the failed allocation kept its IP"
        pool.claim(IP("10.0.0.12"), "stuck")
        with pytest.raises(state.StateError, match="simulated write failure"):
            pool.release(IP("10.0.0.12"), "stuck")
        assert owners(pool)["10.0.0.12"] == "stuck"
        expected = owners(pool)
    with AddressPool(path) as pool:
        assert owners(pool) == expected


def test_a_batch_is_added_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    make_pool(path).close()
    when = f"NEW.ip = {int(IP('10.0.0.25'))}"
    sabotage(path, f"CREATE TRIGGER fail BEFORE INSERT ON addresses WHEN {when} "
                   "BEGIN SELECT RAISE(ABORT, 'disk full'); END")  # fmt: skip
    with AddressPool(path) as pool:
        with pytest.raises(state.StateError, match="disk full"):
            pool.add_range(IP("10.0.0.20"), IP("10.0.0.29"))
        assert pool.stats().total == 3
        assert pool.lookup_mac(mac_for(IP("10.0.0.20"))) is None
        assert pool.allocate("vm1").ip == IP("10.0.0.10")
    with AddressPool(path) as pool:
        assert pool.stats().total == 3


# --- a real crash ------------------------------------------------------------------------------
CHURN = """
import sys
from pathlib import Path
from hatchery.addresses import AddressPool
pool = AddressPool(Path(sys.argv[1]))
held = []
i = 0
while True:
    i += 1
    a = pool.allocate(f"vm{i}")
    held.append((a.ip, f"vm{i}"))
    print("A", a.ip, f"vm{i}", flush=True)
    if i % 3 == 0:
        ip, owner = held.pop(0)
        pool.release(ip, owner)
        print("R", ip, owner, flush=True)
"""


def churn_and_kill(path: Path, acks: int, delay: float) -> list[list[str]]:
    """Run CHURN against ``path``, SIGKILL it ``delay`` s after ``acks`` answers; every answer
    it printed (an allocation or release that returned) is returned."""
    proc = subprocess.Popen([sys.executable, "-c", CHURN, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    done: list[list[str]] = []
    try:
        while len(done) < acks:
            line = proc.stdout.readline()
            assert line, f"the churn stopped early: {proc.stderr.read()}"
            done.append(line.split())
        time.sleep(delay)
    finally:
        proc.kill()
        proc.wait()
    *complete, _partial = proc.stdout.read().split("\n")  # answers printed before the kill
    done += [line.split() for line in complete]
    proc.stdout.close()
    proc.stderr.close()
    return done


@pytest.mark.parametrize("acks", [1, 2, 3, 10, 31, 77, 150, 240])
def test_a_kill_at_any_instant_leaves_the_old_or_the_new_state(tmp_path: Path, acks: int) -> None:
    """Every change that returned is on disk; the one in flight is whole or absent."""
    path = tmp_path / "pool.db"
    make_pool(path, "10.0.0.10", "10.0.0.209").close()
    done = churn_and_kill(path, acks, random.uniform(0, 0.004))
    # Replay what the child was told, then the one change it may have been making.
    free = {int(IP("10.0.0.10")) + n for n in range(200)}
    held: list[tuple[int, str]] = []
    for kind, ip, owner in done:
        if kind == "A":
            assert min(free) == int(IP(ip)), "not the lowest free address"
            free.discard(int(IP(ip)))
            held.append((int(IP(ip)), owner))
        else:
            assert held.pop(0) == (int(IP(ip)), owner)
            free.add(int(IP(ip)))
    old = {ip: owner for ip, owner in held}
    new = dict(old)
    i = int(next(owner for kind, _, owner in reversed(done) if kind == "A")[2:])
    if done[-1][0] == "A" and i % 3 == 0:
        del new[held[0][0]]
    else:
        new[min(free)] = f"vm{i + 1}"
    with AddressPool(path) as pool:  # quick_check and a full load: a torn file fails here
        found = {int(IP(ip)): owner for ip, owner in owners(pool).items() if owner is not None}
        assert found in (old, new)
        assert pool.stats().free == 200 - len(found)


CONVERT = """
import sys
from pathlib import Path
from hatchery.addresses import AddressPool
print("start", flush=True)
AddressPool(Path(sys.argv[1])).close()
print("done", flush=True)
"""


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.4, 0.5, 0.6, 0.8, 1.5])
def test_a_kill_during_conversion_loses_nothing(tmp_path: Path, fraction: float) -> None:
    n = 10_000
    base = int(IP("10.0.0.0"))
    big = Subnet("br0", ipaddress.IPv4Network("10.0.0.0/16"), None, ())
    addresses = [{"ip": str(IP(base + 2 + k)), "mac": mac_for(IP(base + 2 + k)),
                  "owner": f"vm{k}" if k % 7 == 0 else None} for k in range(n)]  # fmt: skip
    raw = (json.dumps({"subnets": [big.to_json()], "addresses": addresses}) + "\n").encode()
    (tmp_path / "pool.json").write_bytes(raw)
    started = time.monotonic()
    AddressPool(tmp_path / "pool.db").close()  # how long one conversion takes here
    took = time.monotonic() - started
    for p in tmp_path.iterdir():
        p.unlink()
    (tmp_path / "pool.json").write_bytes(raw)
    proc = subprocess.Popen([sys.executable, "-c", CONVERT, str(tmp_path / "pool.db")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == "start\n"
    time.sleep(took * fraction)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    with AddressPool(tmp_path / "pool.db") as pool:
        assert pool.stats() == PoolStats(n, n - len(range(0, n, 7)))
        listed = pool.listing()
        assert [e["ip"] for e in listed] == [a["ip"] for a in addresses]
        assert [e["owner"] for e in listed] == [a["owner"] for a in addresses]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.db", "pool.json.migrated"]
    assert (tmp_path / "pool.json.migrated").read_bytes() == raw


RACE = """
import sys, time
from pathlib import Path
from hatchery.addresses import AddressPool
from hatchery.state import StateError
try:
    pool = AddressPool(Path(sys.argv[1]), lock_timeout=0)
except StateError as exc:
    print("refused:", exc.message)
else:
    print("opened", pool.stats().total)
    time.sleep(1)
    pool.close()
"""


def test_two_agents_starting_at_once_convert_once(tmp_path: Path) -> None:
    addresses = [{"ip": f"10.0.0.{k}", "owner": f"vm{k}" if k % 2 else None} for k in range(2, 250)]
    raw = old_pool_json(addresses)
    (tmp_path / "pool.json").write_bytes(raw)
    argv = [sys.executable, "-c", RACE, str(tmp_path / "pool.db")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    said = sorted(proc.communicate(timeout=60)[0].strip() for proc in procs)
    assert said == ["opened 248", "refused: the address pool " + str(tmp_path / "pool.db") +
                    " is in use by another process"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.db", "pool.json.migrated"]
    with AddressPool(tmp_path / "pool.db") as pool:
        assert owners(pool)["10.0.0.3"] == "vm3" and pool.stats().free == 124


# --- conversion of an old pool.json ------------------------------------------------------------
def test_an_old_pool_json_is_converted_whole_and_kept(tmp_path: Path) -> None:
    raw = old_pool_json([
        {"ip": "10.0.0.10", "mac": "52:54:0a:00:00:0a", "owner": "web1"},
        {"ip": "10.0.0.11", "mac": "52:54:0a:00:00:0b", "owner": None},
        {"ip": "10.0.0.12", "mac": "02:00:00:00:00:0c", "owner": "db1"},
    ])  # fmt: skip
    (tmp_path / "pool.json").write_bytes(raw)
    with AddressPool(tmp_path / "pool.db") as pool:
        assert pool.subnets() == [NET]
        assert owners(pool) == {"10.0.0.10": "web1", "10.0.0.11": None, "10.0.0.12": "db1"}
        found = pool.lookup_mac("02:00:00:00:00:0c")
        assert found is not None and found[1] == "db1"
        assert pool.allocate("vm9").ip == IP("10.0.0.11")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.db", "pool.json.migrated"]
    assert (tmp_path / "pool.json.migrated").read_bytes() == raw
    with AddressPool(tmp_path / "pool.db") as pool:  # the next start: nothing to convert
        assert owners(pool)["10.0.0.11"] == "vm9"


def test_conversion_is_tolerant_of_old_spellings(tmp_path: Path) -> None:
    value = {
        "subnets": [{"bridge": "br0", "cidr": "10.0.0.1/24"},  # host bits, no gateway or dns
                    {"bridge": "br0", "cidr": "10.0.0.1/24"}],  # repeated identically
        "addresses": [
            {"ip": "10.0.0.20", "mac": "52-54-0A-00-00-14"},  # dashes, upper case, no owner
            {"ip": "10.0.0.21"},  # no MAC: derived as the pool derives it
            {"ip": "10.0.0.21"},  # repeated identically
            {"ip": "10.7.0.5", "mac": "52:54:0a:07:00:05", "owner": "old"},  # in no subnet
        ],
    }  # fmt: skip
    (tmp_path / "pool.json").write_text(json.dumps(value))
    with AddressPool(tmp_path / "pool.db") as pool:
        assert [str(s.cidr) for s in pool.subnets()] == ["10.0.0.0/24"]
        assert {e["ip"]: (e["mac"], e["owner"], e["bridge"]) for e in pool.listing()} == {
            "10.0.0.20": ("52:54:0a:00:00:14", None, "br0"),
            "10.0.0.21": (mac_for(IP("10.0.0.21")), None, "br0"),
            "10.7.0.5": ("52:54:0a:07:00:05", "old", None),  # kept, never handed out
        }
        pool.release(IP("10.7.0.5"), "old")
        assert [pool.allocate(f"v{i}").ip for i in range(2)] == [IP("10.0.0.20"), IP("10.0.0.21")]
        with pytest.raises(PoolError, match="no free address"):
            pool.allocate("v3")
        pool.add_subnet(Subnet("br1", ipaddress.IPv4Network("10.7.0.0/24"), None, ()))
        assert pool.allocate("v3", bridge="br1").ip == IP("10.7.0.5"), "the subnet adopts it"


@pytest.mark.parametrize(
    ("entries", "named"),
    [
        ([{"ip": "10.0.0.300", "mac": "52:54:00:00:00:01"}], "10.0.0.300"),
        ([{"ip": "10.0.0.5", "mac": "nonsense"}], "nonsense"),
        ([{"ip": "10.0.0.5", "mac": "52:54:00:00:00:01"},
          {"ip": "10.0.0.6", "mac": "52:54:00:00:00:01"}], "MAC 52:54:00:00:00:01 is on both"),
        ([{"ip": "10.0.0.5", "owner": "a"}, {"ip": "10.0.0.5", "owner": "b"}], "listed twice"),
        ([{"ip": "10.0.0.5", "owner": 7}], "not a name"),
    ],
)  # fmt: skip
def test_what_cannot_be_converted_stops_the_start_and_changes_nothing(
    tmp_path: Path, entries: list[dict[str, object]], named: str
) -> None:
    raw = old_pool_json([{"ip": "10.0.0.10", "mac": "52:54:0a:00:00:0a", "owner": "web1"},
                         *entries])  # fmt: skip
    (tmp_path / "pool.json").write_bytes(raw)
    with pytest.raises(state.StateError, match="cannot convert") as err:
        AddressPool(tmp_path / "pool.db")
    assert named in err.value.message
    assert err.value.hint is not None and "nothing was changed" in err.value.hint
    assert [p.name for p in tmp_path.iterdir()] == ["pool.json"]
    assert (tmp_path / "pool.json").read_bytes() == raw


def test_an_unreadable_pool_json_is_set_aside_and_the_pool_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "pool.json").write_text("[1, 2")
    with AddressPool(tmp_path / "pool.db") as pool:
        assert pool.stats().total == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("pool.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == "[1, 2"


def test_a_crash_between_the_two_renames_is_finished(tmp_path: Path) -> None:
    raw = old_pool_json([{"ip": "10.0.0.10", "mac": "52:54:0a:00:00:0a", "owner": "web1"}])
    (tmp_path / "pool.json").write_bytes(raw)
    AddressPool(tmp_path / "pool.db").close()
    # On disk exactly as if the agent died after placing pool.db, before moving pool.json.
    os.replace(tmp_path / "pool.json.migrated", tmp_path / "pool.json")
    with AddressPool(tmp_path / "pool.db") as pool:
        assert owners(pool) == {"10.0.0.10": "web1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.db", "pool.json.migrated"]


def test_a_crash_while_building_the_database_is_redone(tmp_path: Path) -> None:
    raw = old_pool_json([{"ip": "10.0.0.10", "mac": "52:54:0a:00:00:0a", "owner": "web1"}])
    (tmp_path / "pool.json").write_bytes(raw)
    (tmp_path / ".pool.db.tmp").write_bytes(b"SQLite format 3\x00 half written")
    (tmp_path / ".pool.db.tmp-journal").write_bytes(b"half a journal")
    with AddressPool(tmp_path / "pool.db") as pool:
        assert owners(pool) == {"10.0.0.10": "web1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.db", "pool.json.migrated"]


def test_another_pool_json_beside_the_database_stops_the_start(tmp_path: Path) -> None:
    """Say an older agent ran after a downgrade and wrote a pool.json of its own."""
    with make_pool(tmp_path / "pool.db") as pool:
        pool.allocate("vm1")
    raw = old_pool_json([{"ip": "10.0.0.10", "mac": "52:54:0a:00:00:0a", "owner": "other"}])
    (tmp_path / "pool.json").write_bytes(raw)
    with pytest.raises(state.StateError, match="both .* exist") as err:
        AddressPool(tmp_path / "pool.db")
    assert err.value.hint is not None and "hatchery pool add" in err.value.hint
    assert (tmp_path / "pool.json").read_bytes() == raw
    (tmp_path / "pool.json").unlink()  # the operator's decision
    with AddressPool(tmp_path / "pool.db") as pool:
        assert owners(pool)["10.0.0.10"] == "vm1"


def test_a_second_conversion_never_overwrites_the_first_ones_source(tmp_path: Path) -> None:
    (tmp_path / "pool.json.migrated").write_text("the first conversion's source")
    (tmp_path / "pool.json").write_bytes(old_pool_json([]))
    AddressPool(tmp_path / "pool.db").close()
    assert (tmp_path / "pool.json.migrated").read_text() == "the first conversion's source"
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("pool.json.migrated-")]) == 1


# --- a damaged database --------------------------------------------------------------------------
def damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"this is not a database\n" * 100)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
        db.close()
    else:
        with make_pool(path, "10.0.0.2", "10.0.0.250") as pool:
            pool.add_subnet(Subnet("br1", ipaddress.IPv4Network("10.1.0.0/20"), None, ()))
            pool.add_range(IP("10.1.0.1"), IP("10.1.15.254"))
        data = bytearray(path.read_bytes())
        if how == "truncated":
            del data[len(data) * 3 // 5 :]
        else:  # a page in the middle scribbled over
            data[4096 * 5 : 4096 * 6] = b"\xaa" * 4096
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["garbage", "empty", "foreign", "truncated", "scribbled"])
def test_a_damaged_database_is_reported_and_left_alone(tmp_path: Path, how: str) -> None:
    path = tmp_path / "pool.db"
    damage(path, how)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(state.StateError, match="is damaged") as err:
        AddressPool(path)
    assert err.value.hint is not None and "left as it is" in err.value.hint
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    make_pool(tmp_path / "pool.db").close()
    db = sqlite3.connect(tmp_path / "pool.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(state.StateError, match="schema version 99") as err:
        AddressPool(tmp_path / "pool.db")
    assert err.value.hint is not None and "newer agent" in err.value.hint
