"""The preflight's checks as a pure function of what the hosts said."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from hatchery import pki
from hatchery.wire import Health
from hatchery_rollout.client import ImageListing
from hatchery_rollout.inventory import Host
from hatchery_rollout.preflight import (
    HEADROOM,
    HostFacts,
    Source,
    certificate_problem,
    missing_image,
    problems,
)

GIB = 1 << 30
HOSTS = [Host(f"h{i}", f"10.0.0.{i}:6976") for i in range(5)]


def facts(version: str = "v1", images: tuple[str, ...] = ("v1", "v2"),
          free: int | None = 10 * GIB) -> HostFacts:  # fmt: skip
    health = Health(version=version, healthy=True, free_bytes=free)
    return HostFacts(health, images=ImageListing(dict.fromkeys(images, GIB)))


def test_every_problem_names_its_host_in_inventory_order() -> None:
    seen = {
        "h0": facts(),
        "h1": HostFacts(error="connection refused"),
        "h2": facts(images=("v1",)),
        "h3": facts(free=GIB),  # the image (1 GiB) and the headroom do not fit
        "h4": facts(version="v2", images=("v2",), free=0),  # already there: not checked
    }
    found = [p.line() for p in problems(HOSTS, seen, "v2")]
    assert found == [
        "h1: unreachable at 10.0.0.1:6976: connection refused",
        "h2: image v2 is not in its store (publish it there, or --fetch-from PEER)",
        f"h3: 1.00 GiB free on /data, {(GIB + HEADROOM) / GIB:.2f} GiB needed to stage v2",
    ]


def test_a_peer_that_has_the_image_makes_it_fetchable_with_room_for_two() -> None:
    seen = {"h0": facts(images=("v1",), free=2 * GIB + HEADROOM), "h1": facts(images=("v1",))}
    assert problems(HOSTS[:2], seen, "v2", Source("peer:6976", GIB)) == []
    tight = {"h0": facts(images=("v1",), free=2 * GIB)}
    [problem] = problems(HOSTS[:1], tight, "v2", Source("peer:6976", GIB))
    assert "needed to fetch and stage v2" in problem.line()
    assert [h.name for h in missing_image(HOSTS[:2], seen, "v2")] == ["h0", "h1"]
    [lacking] = problems(HOSTS[:1], seen, "v2", Source("peer:6976", None, "HTTP 404"))
    assert lacking.host is None and "does not have v2: HTTP 404" in lacking.line()


def test_unknown_free_space_or_store_is_not_a_problem() -> None:
    """An older agent (no ``free_bytes``) or one without image routes is not refused."""
    old = {"h0": HostFacts(Health(version="v1"), images=None)}
    assert problems(HOSTS[:1], old, "v2") == []


def test_the_certificate_must_outlive_the_rollout(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca")
    cert = pki.issue(tmp_path / "ca", "op", tmp_path, groups=("admin",), days=2).cert
    now = dt.datetime.now(dt.UTC)
    assert certificate_problem(cert, now, 3600, 3600) is None
    late = certificate_problem(cert, now, 2 * 86400, 3600)
    assert late is not None and late.host is None and "expires at" in late.line()
    broken = certificate_problem(tmp_path / "missing.pem", now, 1, 1)
    assert broken is not None and "cannot read the client certificate" in broken.line()
