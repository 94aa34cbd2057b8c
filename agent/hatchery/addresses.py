"""The address pool: (IP, MAC) pairs per subnet, handed to VMs one at a time.

Create takes a free pair, destroy returns it, and the DHCP server asks which address a MAC
has. Subnets and addresses can also be added by hand, as in SmallStack's low-level
hypervisor operations. A node may hold a whole /16 (65 536 addresses), so:

- **Indexed in memory** (``PoolIndex``): a dict by IP, a dict by MAC (the DHCP lookup, once
  per packet), and per bridge a heap of free addresses, so "the lowest free address" costs
  O(log N). The first shape sorted the whole pool per allocation and scanned it per lookup.
- **One row per change on disk** (``PoolStore``): SQLite in WAL mode with ``synchronous =
  FULL``, one transaction per change, so a change writes a few pages instead of the whole
  pool, and a crash at any instant leaves the old or the new state. SQLite's commit is the
  atomic step that temp-file-fsync-rename (``hatchery.state``) is for small files.
- **Disk first, then memory.** A change is committed before the index changes and before an
  address is returned: an address is never handed out twice, across restarts and crashes
  too, and a failed write leaves both as they were.
- **One owner.** The database is held in exclusive locking mode, so a second agent started
  on the same state directory is refused instead of handing out the first one's addresses.
- **Nothing lost on upgrade.** A ``pool.json`` from agents before the database is converted
  on first start and kept as ``pool.json.migrated`` (see ``PoolStore``).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import heapq
import ipaddress
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatchery import state
from hatchery.errors import HatcheryError

log = logging.getLogger(__name__)

IPv4 = ipaddress.IPv4Address


class PoolError(HatcheryError):
    """An allocation or pool change cannot be done."""


def mac_for(ip: IPv4) -> str:
    """A stable, locally administered unicast MAC derived from the IP (52:54 + the 4 bytes)."""
    return "52:54:" + ":".join(f"{b:02x}" for b in ip.packed)


def normalise_mac(mac: str) -> str:
    parts = mac.strip().lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise PoolError(f"bad MAC address {mac!r}")
    try:
        first = int(parts[0], 16)
        [int(p, 16) for p in parts]
    except ValueError as exc:
        raise PoolError(f"bad MAC address {mac!r}") from exc
    if first & 1:
        raise PoolError(f"{mac} is a multicast MAC address")
    return ":".join(parts)


@dataclass(frozen=True, slots=True)
class Subnet:
    bridge: str
    cidr: ipaddress.IPv4Network
    gateway: IPv4 | None
    dns: tuple[IPv4, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "bridge": self.bridge,
            "cidr": str(self.cidr),
            "gateway": str(self.gateway) if self.gateway else None,
            "dns": [str(d) for d in self.dns],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Subnet:
        return cls(
            d["bridge"],
            ipaddress.IPv4Network(d["cidr"]),
            IPv4(d["gateway"]) if d.get("gateway") else None,
            tuple(IPv4(x) for x in d.get("dns", [])),
        )


@dataclass(frozen=True, slots=True)
class Address:
    ip: IPv4
    mac: str
    subnet: Subnet


@dataclass(frozen=True, slots=True)
class PoolStats:
    total: int
    free: int


# A row of the pool: the IP as an integer (ordered, compact), its MAC, its owner or None.
Row = tuple[int, str, str | None]


# --- in memory: the index ------------------------------------------------------------------
class _FreeList:
    """The free addresses of one bridge, lowest first: a binary heap with lazy deletion.

    ``heapq`` gives the lowest free address in O(log N). An address taken out of order
    (``claim`` at re-adoption) is not searched for in the heap: it stays there and is dropped
    when it reaches the top. ``_queued`` keeps each address in the heap at most once, so the
    heap never outgrows the bridge's addresses and each stale entry costs one pop, once:
    allocation is O(log N) amortised.
    """

    __slots__ = ("_heap", "_queued")

    def __init__(self) -> None:
        self._heap: list[int] = []
        self._queued: set[int] = set()

    def push(self, ip: int) -> None:
        if ip not in self._queued:
            self._queued.add(ip)
            heapq.heappush(self._heap, ip)

    def lowest(self, is_free: Callable[[int], bool]) -> int | None:
        """The lowest free address, dropping the stale ones found on top."""
        heap = self._heap
        while heap:
            ip = heap[0]
            if is_free(ip):
                return ip
            heapq.heappop(heap)
            self._queued.discard(ip)
        return None


class PoolIndex:
    """The pool in memory, indexed for each question asked of it. No I/O, no locking.

    Subnets are few but looked up per address: they are kept sorted by network address and
    found by bisection (they never overlap). Addresses outside every known subnet can only
    come from old pool files; they are kept (never dropped) but never handed out, until a
    subnet that holds them is added.
    """

    def __init__(self) -> None:
        self._subnets: list[Subnet] = []  # in the order they were added, for listings
        self._sorted: list[Subnet] = []  # by network address, for subnet_of
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._entries: dict[int, tuple[str, str | None]] = {}  # ip -> (mac, owner)
        self._by_mac: dict[str, int] = {}
        self._free: dict[str, _FreeList] = {}  # bridge -> its free addresses
        self._orphans: set[int] = set()  # addresses in no known subnet
        self._nfree = 0

    # subnets
    def subnets(self) -> list[Subnet]:
        return list(self._subnets)

    def subnet_of(self, ip: int) -> Subnet | None:
        i = bisect.bisect_right(self._starts, ip) - 1
        if i >= 0 and ip <= self._ends[i]:
            return self._sorted[i]
        return None

    def add_subnet(self, subnet: Subnet) -> None:
        start = int(subnet.cidr.network_address)
        end = int(subnet.cidr.broadcast_address)
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, end)
        self._sorted.insert(i, subnet)
        self._subnets.append(subnet)
        free = self._free.setdefault(subnet.bridge, _FreeList())
        for ip in [ip for ip in self._orphans if start <= ip <= end]:
            self._orphans.discard(ip)
            if self._entries[ip][1] is None:
                free.push(ip)

    # addresses
    def get(self, ip: int) -> tuple[str, str | None] | None:
        """(MAC, owner) of ``ip``, or None if it is not in the pool."""
        return self._entries.get(ip)

    def ip_of_mac(self, mac: str) -> int | None:
        return self._by_mac.get(mac)

    def add(self, ip: int, mac: str, owner: str | None) -> None:
        self._entries[ip] = (mac, owner)
        self._by_mac[mac] = ip
        subnet = self.subnet_of(ip)
        if subnet is None:
            self._orphans.add(ip)
        if owner is None:
            self._nfree += 1
            if subnet is not None:
                self._free[subnet.bridge].push(ip)

    def set_owner(self, ip: int, owner: str | None) -> None:
        mac, before = self._entries[ip]
        self._entries[ip] = (mac, owner)
        if before is None and owner is not None:
            self._nfree -= 1  # its heap entry goes stale, dropped when it reaches the top
        elif before is not None and owner is None:
            self._nfree += 1
            subnet = self.subnet_of(ip)
            if subnet is not None:
                self._free[subnet.bridge].push(ip)

    def _is_free(self, ip: int) -> bool:
        return self._entries[ip][1] is None

    def lowest_free(self, bridge: str | None = None) -> int | None:
        """The lowest free address that can be handed out (on ``bridge`` if given)."""
        if bridge is not None:
            free = self._free.get(bridge)
            return free.lowest(self._is_free) if free is not None else None
        found = (f.lowest(self._is_free) for f in self._free.values())
        return min((ip for ip in found if ip is not None), default=None)

    def rows(self) -> list[Row]:
        """Every address, lowest first (O(N log N): for listings, not for the hot path)."""
        return [(ip, mac, owner) for ip, (mac, owner) in sorted(self._entries.items())]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def free(self) -> int:
        return self._nfree


# --- on disk: the store --------------------------------------------------------------------
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE subnets (
    cidr TEXT PRIMARY KEY,         -- 10.0.0.0/24
    bridge TEXT NOT NULL,
    gateway TEXT,                  -- NULL: none
    dns TEXT NOT NULL DEFAULT ''   -- space-separated
);
CREATE TABLE addresses (
    ip INTEGER PRIMARY KEY,        -- the IPv4 address as an integer: ordered, compact
    mac TEXT NOT NULL UNIQUE,
    owner TEXT                     -- the VM's name; NULL: free
);
-- For operators reading a stopped node's pool with sqlite3: dotted IPs, lowest first.
CREATE VIEW addresses_text AS
    SELECT (ip >> 24) || '.' || ((ip >> 16) & 255) || '.' || ((ip >> 8) & 255) || '.'
           || (ip & 255) AS ip, mac, owner
    FROM addresses ORDER BY addresses.ip;
"""
# The statements run per change. Each touches one row through a primary key (O(log N) in the
# B-tree); tests/unit/agent/test_pool_scale.py checks that the update never scans.
SET_OWNER = "UPDATE addresses SET owner = ? WHERE ip = ?"
INSERT_ADDRESS = "INSERT INTO addresses (ip, mac, owner) VALUES (?, ?, ?)"
INSERT_SUBNET = "INSERT INTO subnets (cidr, bridge, gateway, dns) VALUES (?, ?, ?, ?)"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _subnet_row(s: Subnet) -> tuple[str, str, str | None, str]:
    return (str(s.cidr), s.bridge, str(s.gateway) if s.gateway else None,
            " ".join(str(d) for d in s.dns))  # fmt: skip


def parse_legacy(raw: Any) -> tuple[list[Subnet], list[Row], list[str]]:
    """Subnets and rows of an old ``pool.json``, read tolerantly, and the problems found.

    Tolerated: missing ``subnets``/``addresses``/``gateway``/``dns``/``owner``/``mac`` (the
    MAC is then derived), MACs in any case or with dashes, a CIDR with host bits set,
    entries repeated identically, addresses outside every subnet (kept, as the old pool
    kept them). Anything that cannot be converted without guessing (a bad IP or MAC, one
    MAC on two IPs, overlapping subnets) is a problem: the caller refuses to convert rather
    than drop it.
    """
    problems: list[str] = []
    if not isinstance(raw, dict):
        return [], [], [f"the top level is a {type(raw).__name__}, not an object"]
    subnets: list[Subnet] = []
    for i, item in enumerate(raw.get("subnets") or []):
        try:
            if not isinstance(item, dict) or not isinstance(item.get("bridge"), str):
                raise ValueError("needs a bridge name and a cidr")
            s = Subnet(
                item["bridge"],
                ipaddress.IPv4Network(item["cidr"], strict=False),
                IPv4(item["gateway"]) if item.get("gateway") else None,
                tuple(IPv4(x) for x in item.get("dns") or []),
            )
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"subnet #{i + 1} {item!r}: {exc}")
            continue
        if s in subnets:
            continue
        clash = next((t for t in subnets if t.cidr.overlaps(s.cidr)), None)
        if clash is not None:
            problems.append(
                f"subnet {s.cidr} on {s.bridge} overlaps {clash.cidr} on {clash.bridge}"
            )
            continue
        subnets.append(s)
    entries: dict[int, tuple[str, str | None]] = {}
    macs: dict[str, int] = {}
    for i, item in enumerate(raw.get("addresses") or []):
        try:
            if not isinstance(item, dict):
                raise ValueError("not an object")
            ip = IPv4(item["ip"])
            mac = normalise_mac(item["mac"]) if item.get("mac") else mac_for(ip)
            owner = item.get("owner")
            if owner is not None and not isinstance(owner, str):
                raise ValueError(f"owner {owner!r} is not a name")
        except (KeyError, TypeError, ValueError, AttributeError, PoolError) as exc:
            problems.append(f"address #{i + 1} {item!r}: {exc}")
            continue
        key = int(ip)
        if key in entries:
            if entries[key] != (mac, owner):
                problems.append(f"address {ip} is listed twice, differently")
            continue
        if mac in macs:
            problems.append(f"MAC {mac} is on both {IPv4(macs[mac])} and {ip}")
            continue
        entries[key] = (mac, owner)
        macs[mac] = key
    rows = [(ip, mac, owner) for ip, (mac, owner) in sorted(entries.items())]
    return subnets, rows, problems


@contextlib.contextmanager
def _startup_lock(directory: Path) -> Iterator[None]:
    """Serialise pool start-ups in ``directory`` (``flock`` on the folder itself, released by
    the kernel if the process dies): a second agent started at the same instant must not
    remove or rename the first one's temporaries while it builds them. Once the first has
    the database open, the second waits only for the end of that and is then refused by
    SQLite's lock."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class PoolStore:
    """The pool in SQLite: WAL journal, ``synchronous = FULL``, one transaction per change.

    Why this shape:

    - WAL appends a change's pages to the log and fsyncs once; with ``synchronous = FULL`` a
      committed change survives power loss, not only a crash of the process.
    - ``pool.db`` only ever appears complete: a new or converted database is built as
      ``.pool.db.tmp`` and renamed into place (then the folder is fsynced). A crash during
      the build leaves the temporary, which the next start removes and builds again. So a
      ``pool.db`` that does not open, is empty or fails SQLite's ``quick_check`` is damage:
      it is reported with a hint and left untouched, never replaced.
    - Conversion of an old ``pool.json``: parsed tolerantly (``parse_legacy``); a file that
      is not JSON at all is set aside as ``pool.json.corrupt-<time>`` (as every state file
      is) and the pool starts empty; a file with entries that cannot be converted stops the
      start with a message naming them, and nothing changes. The database records the
      SHA-256 of the file it was made from, then the file is renamed ``pool.json.migrated``.
      A crash between the two renames is recognised at the next start by that hash and
      finished; a ``pool.json`` with any other content next to ``pool.db`` (say, written by
      an older agent after a downgrade) stops the start: neither is chosen silently.
    - Exclusive locking mode (no ``-shm`` file): the lock is taken at open and held until
      close, so a second process cannot change the pool behind this one's index.

    Write failures raise ``state.StateError`` after a rollback, so nothing changed.
    """

    def __init__(self, path: Path, legacy: Path | None = None, *, lock_timeout: float = 2.0):
        self.path = path
        self._db: sqlite3.Connection | None = None
        with _startup_lock(path.parent):
            self._remove_temporaries()
            if not path.exists():
                self._create(legacy)
            self._db = self._open(lock_timeout)
            try:
                if legacy is not None and legacy.exists():
                    self._settle_legacy(legacy)
            except BaseException:
                self.close()
                raise

    # --- open, create, convert ---------------------------------------------------------
    @property
    def _tmp(self) -> Path:
        return self.path.with_name(f".{self.path.name}.tmp")

    def _remove_temporaries(self) -> None:
        for leftover in (self._tmp, self._tmp.with_name(self._tmp.name + "-journal")):
            if leftover.exists():
                log.warning("removing %s, left by a start that did not finish", leftover)
                leftover.unlink()

    def _create(self, legacy: Path | None) -> None:
        """Build a new database aside, from ``legacy`` if it exists, and rename it into place."""
        subnets: list[Subnet] = []
        rows: list[Row] = []
        meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if legacy is not None and legacy.exists():
            try:
                raw = legacy.read_bytes()
            except OSError as exc:
                raise state.StateError(f"cannot read {legacy}: {exc.strerror or exc}") from exc
            try:
                parsed = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                state.set_aside(legacy, str(exc))
            else:
                subnets, rows, problems = parse_legacy(parsed)
                if problems:
                    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                    raise state.StateError(
                        f"cannot convert {legacy} to {self.path.name}: "
                        + "; ".join(problems[:3]) + more,
                        hint=f"fix or remove those entries in {legacy} and start again; "
                        "nothing was changed",
                    )  # fmt: skip
                meta["migrated_from"] = str(legacy)
                meta["migrated_sha256"] = _sha256(raw)
        tmp = self._tmp
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        try:
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                db.execute("PRAGMA synchronous = FULL")
                db.executescript("BEGIN;" + _SCHEMA)  # one transaction: one fsync
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
                db.executemany(INSERT_SUBNET, [_subnet_row(s) for s in subnets])
                db.executemany(INSERT_ADDRESS, rows)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            finally:
                db.close()
            os.replace(tmp, self.path)
            state.fsync_dir(self.path.parent)
        except (OSError, sqlite3.Error) as exc:
            tmp.unlink(missing_ok=True)
            raise state.StateError(f"cannot create {self.path}: {exc}") from exc
        if "migrated_sha256" in meta:
            assert legacy is not None
            log.info("address pool %s converted to %s: %d subnets, %d addresses",
                     legacy, self.path, len(subnets), len(rows))  # fmt: skip
            self._keep_migrated(legacy)

    def _keep_migrated(self, legacy: Path) -> None:
        aside = legacy.with_name(legacy.name + ".migrated")
        if aside.exists():  # never overwrite an older conversion's source
            aside = aside.with_name(f"{aside.name}-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(legacy, aside)
        state.fsync_dir(legacy.parent)
        log.info("the old pool file is kept as %s", aside)

    def _settle_legacy(self, legacy: Path) -> None:
        """``legacy`` next to an open database: the end of a conversion, or a conflict."""
        db = self._connection()
        found = db.execute("SELECT value FROM meta WHERE key = 'migrated_sha256'").fetchone()
        if found is not None and found[0] == _sha256(legacy.read_bytes()):
            self._keep_migrated(legacy)  # a crash came between the two renames: finish
            return
        raise state.StateError(
            f"both {self.path} and {legacy} exist, and {legacy.name} is not the file "
            f"{self.path.name} was made from",
            hint=f"{self.path.name} is the live pool; if {legacy.name} holds addresses that "
            "are still needed, add them with 'hatchery pool add', then move it away",
        )

    def _open(self, lock_timeout: float) -> sqlite3.Connection:
        # mode=rw: never create a file here, so a vanished pool.db is not replaced by an
        # empty one behind the operator's back.
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=lock_timeout, isolation_level=None,
                                 check_same_thread=False)  # fmt: skip
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc
        try:
            # Exclusive mode before WAL: no shared-memory file, and every lock taken is kept.
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            # Read and check before anything writes (switching to WAL writes the header).
            version = db.execute("PRAGMA user_version").fetchone()[0]
            check = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                raise self._damaged("; ".join(check[:3]))
            if version == 0:
                raise self._damaged("it holds no pool (an empty or foreign SQLite file)")
            if version > SCHEMA_VERSION:
                raise state.StateError(
                    f"{self.path} has schema version {version}; this agent knows {SCHEMA_VERSION}",
                    hint="a newer agent wrote it: run that version, or restore an older backup",
                )
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal mode is {mode}, not wal")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("BEGIN EXCLUSIVE")  # take the write lock now; exclusive mode keeps it
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            db.close()
            raise self._open_error(exc) from exc
        except BaseException:
            db.close()
            raise
        return db

    def _damaged(self, why: str) -> state.StateError:
        return state.StateError(
            f"the address pool {self.path} is damaged: {why}",
            hint="it was left as it is. Restore it from a backup, or move it aside to start "
            "an empty pool: the configured ranges are seeded again and running VMs in them "
            "re-claim their addresses; addresses added by hand must be added again",
        )

    def _open_error(self, exc: sqlite3.Error) -> state.StateError:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
            return state.StateError(
                f"the address pool {self.path} is in use by another process",
                hint="is another hatchery-agent running with the same state_dir? stop it first",
            )
        if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return self._damaged(str(exc))
        return state.StateError(f"cannot open the address pool {self.path}: {exc}")

    # --- read and write ------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise PoolError(f"the address pool {self.path} is closed")
        return self._db

    def load(self) -> tuple[list[Subnet], list[Row]]:
        """Every subnet (in the order added) and every address; a bad row is damage."""
        db = self._connection()
        subnets: list[Subnet] = []
        rows: list[Row] = []
        row: Any = None
        try:
            for row in db.execute("SELECT cidr, bridge, gateway, dns FROM subnets ORDER BY rowid"):
                cidr, bridge, gateway, dns = row
                subnets.append(Subnet(bridge, ipaddress.IPv4Network(cidr),
                                      IPv4(gateway) if gateway else None,
                                      tuple(IPv4(d) for d in dns.split())))  # fmt: skip
            for row in db.execute("SELECT ip, mac, owner FROM addresses"):
                ip, mac, owner = row
                if not isinstance(ip, int) or not 0 <= ip < 2**32 or normalise_mac(mac) != mac:
                    raise ValueError("not an IPv4 address and a normalised MAC")
                if owner is not None and not isinstance(owner, str):
                    raise ValueError("the owner is not a name")
                rows.append((ip, mac, owner))
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc
        except (ValueError, TypeError, AttributeError, PoolError) as exc:
            raise self._damaged(f"row {row!r}: {exc}") from exc
        return subnets, rows

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed whole, or rolled back and reported as a StateError."""
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise state.StateError(f"cannot write {self.path}: {exc}") from exc
            raise

    def add_subnet(self, subnet: Subnet) -> None:
        with self._write() as db:
            db.execute(INSERT_SUBNET, _subnet_row(subnet))

    def add_addresses(self, rows: Iterable[Row]) -> None:
        with self._write() as db:
            db.executemany(INSERT_ADDRESS, rows)

    def set_owner(self, ip: int, owner: str | None) -> None:
        with self._write() as db:
            if db.execute(SET_OWNER, (owner, ip)).rowcount != 1:
                raise sqlite3.IntegrityError(f"{IPv4(ip)} is not in the database")

    def close(self) -> None:
        """Checkpoint the log into the database and release the lock (idempotent)."""
        db, self._db = self._db, None
        if db is not None:
            db.close()


# --- the pool: index and store behind one lock ---------------------------------------------
class AddressPool:
    """Thread-safe, persisted pool. ``owner`` is the VM's name, or None when free.

    ``path`` is the database (``<state_dir>/pool.db``); an old ``pool.json`` beside it
    (``legacy``, the same name with ``.json``) is converted on first start. Close the pool
    when done (or use it as a context manager): it holds the database's lock until then.

    Every method that changes the pool writes the store first and the index after, under
    the lock: a failed write (``state.StateError``) leaves both unchanged.
    """

    def __init__(self, path: Path, *, legacy: Path | None = None, lock_timeout: float = 2.0):
        if path.suffix == ".json":
            raise ValueError(f"{path}: the pool is a SQLite database now; pass pool.db "
                             "(a pool.json beside it is converted on first start)")  # fmt: skip
        self._lock = threading.Lock()
        self._store = PoolStore(path, legacy or path.with_suffix(".json"),
                                lock_timeout=lock_timeout)  # fmt: skip
        self._index = PoolIndex()
        try:
            subnets, rows = self._store.load()
        except BaseException:
            self._store.close()
            raise
        for subnet in subnets:
            self._index.add_subnet(subnet)
        for ip, mac, owner in rows:
            self._index.add(ip, mac, owner)
        log.info("address pool %s: %d subnets, %d addresses, %d free",
                 path, len(subnets), len(rows), self._index.free)  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._store.close()

    def __enter__(self) -> AddressPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _address(self, ip: int) -> Address:
        found = self._index.get(ip)
        subnet = self._index.subnet_of(ip)
        assert found is not None and subnet is not None
        return Address(IPv4(ip), found[0], subnet)

    # --- subnets ----------------------------------------------------------------------
    def subnets(self) -> list[Subnet]:
        with self._lock:
            return self._index.subnets()

    def add_subnet(self, subnet: Subnet) -> bool:
        """Add ``subnet``; False if it is already there (same bridge and CIDR)."""
        with self._lock:
            for s in self._index.subnets():
                if s.cidr == subnet.cidr and s.bridge == subnet.bridge:
                    return False
                if s.cidr.overlaps(subnet.cidr):
                    raise PoolError(f"subnet {subnet.cidr} overlaps {s.cidr} on {s.bridge}")
            if subnet.gateway is not None and subnet.gateway not in subnet.cidr:
                raise PoolError(f"gateway {subnet.gateway} is outside {subnet.cidr}")
            self._store.add_subnet(subnet)
            self._index.add_subnet(subnet)
            return True

    # --- addresses ----------------------------------------------------------------------
    def add_addresses(self, pairs: list[tuple[IPv4, str | None]]) -> int:
        """Add (IP, MAC) pairs (MAC derived when None); return how many were new.

        All or nothing: every pair is checked before one transaction adds the new ones.
        """
        with self._lock:
            new: dict[int, str] = {}
            new_macs: set[str] = set()
            for ip, mac in pairs:
                key = int(ip)
                subnet = self._index.subnet_of(key)
                if subnet is None:
                    raise PoolError(f"{ip} is in no known subnet", hint="add the subnet first")
                if ip in (subnet.cidr.network_address, subnet.cidr.broadcast_address):
                    raise PoolError(f"{ip} is the network or broadcast address of {subnet.cidr}")
                if ip == subnet.gateway or ip in subnet.dns:
                    raise PoolError(f"{ip} is the gateway or a DNS server of {subnet.cidr}")
                norm = normalise_mac(mac) if mac else mac_for(ip)
                known = self._index.get(key)
                if known is not None or key in new:
                    had = known[0] if known is not None else new[key]
                    if had != norm:
                        raise PoolError(f"{ip} is already in the pool with MAC {had}")
                    continue
                if self._index.ip_of_mac(norm) is not None or norm in new_macs:
                    raise PoolError(f"MAC {norm} is already in the pool")
                new[key] = norm
                new_macs.add(norm)
            if new:
                self._store.add_addresses((key, mac, None) for key, mac in new.items())
                for key, mac in new.items():
                    self._index.add(key, mac, None)
            return len(new)

    def add_range(self, start: IPv4, end: IPv4) -> int:
        if end < start:
            raise PoolError(f"range end {end} is before its start {start}")
        if int(end) - int(start) >= 65536:
            raise PoolError("a range may hold at most 65536 addresses")
        return self.add_addresses([(IPv4(i), None) for i in range(int(start), int(end) + 1)])

    def allocate(self, owner: str, bridge: str | None = None) -> Address:
        """Take the lowest free address (on ``bridge`` if given); persisted before returned."""
        with self._lock:
            ip = self._index.lowest_free(bridge)
            if ip is not None:
                self._store.set_owner(ip, owner)
                self._index.set_owner(ip, owner)
                return self._address(ip)
        where = f" on bridge {bridge}" if bridge else ""
        raise PoolError(f"no free address{where}", hint="add addresses: hatchery pool add ...")

    def claim(self, ip: IPv4, owner: str) -> Address:
        """Mark ``ip`` as held by ``owner`` (re-adoption); idempotent for the same owner."""
        with self._lock:
            key = int(ip)
            found = self._index.get(key)
            if found is None:
                raise PoolError(f"{ip} is not in the pool")
            holder = found[1]
            if holder not in (None, owner):
                raise PoolError(f"{ip} is held by {holder}")
            if self._index.subnet_of(key) is None:
                raise PoolError(f"{ip} is in no known subnet", hint="add the subnet first")
            if holder is None:
                self._store.set_owner(key, owner)
                self._index.set_owner(key, owner)
            return self._address(key)

    def release(self, ip: IPv4, owner: str) -> None:
        """Return ``ip`` to the pool if ``owner`` holds it; anything else changes nothing."""
        with self._lock:
            key = int(ip)
            found = self._index.get(key)
            if found is None or found[1] != owner:
                return
            self._store.set_owner(key, None)
            self._index.set_owner(key, None)

    def lookup_mac(self, mac: str) -> tuple[Address, str | None] | None:
        """The address with this MAC and its owner (for DHCP static leases): O(1)."""
        norm = normalise_mac(mac)
        with self._lock:
            ip = self._index.ip_of_mac(norm)
            found = self._index.get(ip) if ip is not None else None
            subnet = self._index.subnet_of(ip) if ip is not None else None
            if ip is None or found is None or subnet is None:
                return None
            return Address(IPv4(ip), found[0], subnet), found[1]

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"ip": str(IPv4(ip)), "mac": mac, "owner": owner,
                 "bridge": s.bridge if (s := self._index.subnet_of(ip)) else None}
                for ip, mac, owner in self._index.rows()
            ]  # fmt: skip

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(len(self._index), self._index.free)
