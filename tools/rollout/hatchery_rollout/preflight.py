"""Before a rollout changes anything: can it finish? One line per problem, naming the host.

``hatchery-rollout run`` asks every host first (``gather``), then checks (``problems``, a
pure function of what it learnt):

- **reachable**: every host answers ``/healthz``; a host failing a check *now* is fine (that
  is its baseline, which later health checks do not count), a host that does not answer is
  not;
- **the image is there**: the target version is in each host's store, or ``--fetch-from
  PEER`` names a peer that has it (each host then fetches it from there before the first
  wave: ``distribute``);
- **room to stage it**: each host's free space on /data (``free_bytes`` in ``/healthz``)
  holds the image once more, twice when it must be fetched first, plus ``HEADROOM``;
- **the certificate lasts**: the client certificate is valid past the predicted end of the
  rollout plus a margin (Dominator's hyper-control refuses a rollout that would outlive its
  certificate too), so a long rollout never halts half-way on an expired credential.

``--dry-run`` prints the problems (exit 1 if any); ``run`` refuses with them and changes
nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from hatchery.wire import Health
from hatchery_rollout.client import AgentClient, ImageListing
from hatchery_rollout.errors import AgentError, RolloutError
from hatchery_rollout.inventory import Host

HEADROOM = 512 << 20  # what /data keeps beyond the image: logs, VM state, the journal


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the rollout cannot start; ``host`` None: the rollout as a whole."""

    host: str | None
    what: str

    def line(self) -> str:
        return f"{self.host}: {self.what}" if self.host else self.what


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What one host said before the rollout: its health (None: no answer, see ``error``)
    and its image store (None: not asked, or the agent has no store routes)."""

    health: Health | None = None
    error: str | None = None
    images: ImageListing | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """Where hosts without the image would fetch it: ``peer`` and the image's size there
    (``size`` None: the peer does not have it, or did not answer: ``error``)."""

    peer: str
    size: int | None
    error: str | None = None


def certificate_problem(
    cert: Path, now: dt.datetime, predicted_seconds: float, margin_seconds: float
) -> Problem | None:
    """The client certificate must outlive the predicted rollout plus ``margin_seconds``."""
    try:
        not_after = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    except (OSError, ValueError) as exc:
        return Problem(None, f"cannot read the client certificate {cert}: {exc}")
    needed = now + dt.timedelta(seconds=predicted_seconds + margin_seconds)
    if not_after < needed:
        left = max(0.0, (not_after - now).total_seconds())
        return Problem(
            None,
            f"the client certificate {cert} expires at {not_after:%Y-%m-%d %H:%M} UTC, "
            f"{left / 3600:.1f} h from now; the rollout is predicted to take "
            f"{predicted_seconds / 3600:.1f} h plus a {margin_seconds / 3600:.1f} h margin "
            "(renew it: hatchery ca issue ... --force)",
        )
    return None


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


def problems(
    hosts: Sequence[Host],
    facts: Mapping[str, HostFacts],
    version: str,
    source: Source | None = None,
) -> list[Problem]:
    """Every reason a host cannot be upgraded to ``version``, in inventory order."""
    found: list[Problem] = []
    if source is not None and source.size is None:
        why = f": {source.error}" if source.error else ""
        found.append(Problem(None, f"--fetch-from {source.peer} does not have {version}{why}"))
    for host in hosts:
        fact = facts.get(host.name, HostFacts(error="not asked"))
        if fact.health is None:
            found.append(Problem(host.name, f"unreachable at {host.address}: {fact.error}"))
            continue
        if fact.health.version == version:
            continue  # already there: skipped
        listing = fact.images
        size: int | None = None
        fetch = False
        if listing is not None:
            size = listing.sizes.get(version)
            if size is None:
                if source is None:
                    found.append(Problem(host.name, f"image {version} is not in its store "
                                         "(publish it there, or --fetch-from PEER)"))  # fmt: skip
                    continue
                fetch, size = True, source.size
        free = fact.health.free_bytes
        if size is not None and free is not None:
            need = size * (2 if fetch else 1) + HEADROOM
            if free < need:
                found.append(Problem(host.name, f"{_gib(free)} free on /data, {_gib(need)} "
                                     f"needed to {'fetch and ' if fetch else ''}stage "
                                     f"{version}"))  # fmt: skip
    return found


def missing_image(
    hosts: Sequence[Host], facts: Mapping[str, HostFacts], version: str
) -> list[Host]:
    """The hosts (not on ``version`` yet) whose store lacks it: what ``distribute`` fetches."""
    out = []
    for host in hosts:
        fact = facts.get(host.name)
        if fact is None or fact.health is None or fact.health.version == version:
            continue
        if fact.images is not None and version not in fact.images.sizes:
            out.append(host)
    return out


async def gather(client: AgentClient, hosts: Sequence[Host], limit: int) -> dict[str, HostFacts]:
    """Ask every host for its health and its image store, ``limit`` at a time.

    ``limit`` workers take the hosts in turn (no task per host waiting its turn); both
    requests go over one connection, which the second one closes.
    """
    out: dict[str, HostFacts] = {}
    queue = iter(hosts)

    async def one(host: Host) -> HostFacts:
        try:
            health = await client.health(host)
        except AgentError as exc:
            return HostFacts(error=str(exc))
        try:
            images = await client.images(host, close=True)
        except AgentError as exc:
            return HostFacts(health, error=str(exc))
        return HostFacts(health, images=images)

    async def worker() -> None:
        for host in queue:
            out[host.name] = await one(host)

    await asyncio.gather(*(worker() for _ in range(max(1, min(limit, len(hosts))))))
    return out


async def source_of(client: AgentClient, peer: Host, version: str) -> Source:
    try:
        listing = await client.images(peer)
    except AgentError as exc:
        return Source(peer.address, None, str(exc))
    if listing is None:
        return Source(peer.address, None, "it has no image store")
    return Source(peer.address, listing.sizes.get(version))


async def distribute(
    client: AgentClient, hosts: Sequence[Host], peer: str, version: str, limit: int
) -> list[Problem]:
    """Each host fetches ``version`` from ``peer`` (``POST /v1/images/fetch``), ``limit`` at a
    time (they all pull from that one peer); the hosts that could not, one line each."""
    sem = asyncio.Semaphore(limit)
    failed: list[Problem] = []

    async def one(host: Host) -> None:
        async with sem:
            try:
                await client.fetch_image(host, peer, version)
            except AgentError as exc:
                failed.append(Problem(host.name, f"cannot fetch {version} from {peer}: {exc}"))

    await asyncio.gather(*(one(h) for h in hosts))
    order = {h.name: i for i, h in enumerate(hosts)}
    return sorted(failed, key=lambda p: order.get(p.host or "", -1))


def refuse(found: Sequence[Problem]) -> RolloutError:
    """The error ``run`` stops with: every problem on its own line."""
    lines = "\n".join(f"  {p.line()}" for p in found)
    return RolloutError(
        f"preflight found {len(found)} problem(s); nothing was changed:\n{lines}",
        hint="fix them (or remove those hosts from the inventory), then run again; "
        "--dry-run lists them without starting",
    )
