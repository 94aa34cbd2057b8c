"""The planner is pure: waves, progressions, caps, spread and empty-hosts-first."""

from __future__ import annotations

from collections import Counter

import pytest

from hatchery_rollout.errors import PlanError
from hatchery_rollout.inventory import Host, synthetic_fleet
from hatchery_rollout.planner import (
    PlanOptions,
    format_duration,
    linear_steps,
    make_plan,
    parse_progression,
    predict_window,
)


def sizes(n: int, **kw: object) -> list[int]:
    plan = make_plan(synthetic_fleet(n).hosts, PlanOptions(**kw))  # type: ignore[arg-type]
    return [len(w) for w in plan.waves]


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, []), (1, [1]), (2, [1, 1]), (3, [1, 2]), (6, [1, 2, 3]), (7, [1, 2, 3, 1])],
)
def test_linear_small(n: int, expected: list[int]) -> None:
    assert sizes(n) == expected


def test_linear_100_is_14_steps_of_the_paper() -> None:
    got = sizes(100)
    assert len(got) == 14
    assert got[:13] == list(range(1, 14))
    assert got[-1] == 100 - sum(range(1, 14))
    plan = make_plan(synthetic_fleet(100).hosts)
    assert format_duration(plan.predict_barrier(15)) == "3m30s"


def test_linear_10000() -> None:
    plan = make_plan(synthetic_fleet(10_000).hosts)
    assert len(plan.waves) == 141 == linear_steps(10_000)
    assert format_duration(plan.predict_barrier(15)) == "35m15s"
    names = [h.name for w in plan.waves for h in w]
    assert len(names) == len(set(names)) == 10_000


def test_every_host_once_in_inventory_order() -> None:
    hosts = synthetic_fleet(50).hosts
    plan = make_plan(hosts)
    assert [h for w in plan.waves for h in w] == list(hosts)


def test_exponential() -> None:
    assert sizes(20, progression=parse_progression("exponential")) == [1, 2, 4, 8, 5]


def test_explicit_list_last_value_repeats() -> None:
    assert sizes(30, progression=parse_progression("1,5,10")) == [1, 5, 10, 10, 4]


def test_explicit_percent() -> None:
    # 10% of 100 = 10 hosts a wave after 1 and 5.
    got = sizes(100, progression=parse_progression("1,5,10%"))
    assert got == [1, 5] + [10] * 9 + [4]


def test_percent_rounds_up_to_one() -> None:
    assert sizes(3, progression=parse_progression("1%")) == [1, 1, 1]


@pytest.mark.parametrize("bad", ["", "0", "a,b", "1,-2", "150%", "1,,2"])
def test_bad_progressions(bad: str) -> None:
    with pytest.raises(PlanError):
        parse_progression(bad)


def test_max_concurrency_caps_every_wave() -> None:
    got = sizes(100, max_concurrency=5)
    assert got[:5] == [1, 2, 3, 4, 5]
    assert max(got) == 5
    assert sum(got) == 100
    with pytest.raises(PlanError):
        sizes(3, max_concurrency=0)


def test_hosts_without_vms_first_keeps_order_otherwise() -> None:
    hosts = [
        Host("a", "h:1", vms=3),
        Host("b", "h:2", vms=0),
        Host("c", "h:3"),
        Host("d", "h:4", vms=0),
        Host("e", "h:5", vms=1),
    ]
    plan = make_plan(hosts)
    assert [h.name for w in plan.waves for h in w] == ["b", "d", "a", "c", "e"]
    off = make_plan(hosts, PlanOptions(empty_first=False))
    assert [h.name for w in off.waves for h in w] == ["a", "b", "c", "d", "e"]


def racked(per_rack: dict[str, int]) -> list[Host]:
    hosts = []
    for rack, count in per_rack.items():
        for i in range(count):
            hosts.append(Host(f"{rack}-{i}", f"10.0.0.1:{len(hosts) + 1}", ("eu", "fra1", rack)))
    return hosts


def check_spread(waves: tuple[tuple[Host, ...], ...], depth: int) -> None:
    planned = 0
    total = sum(len(w) for w in waves)
    all_hosts = [h for w in waves for h in w]
    for wave in waves:
        counts = Counter(h.location[:depth] for h in wave)
        # domains with hosts still to do beyond this wave
        later = {h.location[:depth] for h in all_hosts[planned + len(wave) :]}
        for domain, count in counts.items():
            if count > 1:  # only allowed when no other domain has hosts left
                assert later <= {domain}, (wave, later)
        planned += len(wave)
    assert planned == total


def test_spread_rack_never_two_of_a_rack_while_others_pending() -> None:
    hosts = racked({"r1": 10, "r2": 3, "r3": 5, "r4": 1})
    plan = make_plan(hosts, PlanOptions(spread="rack"))
    check_spread(plan.waves, 3)
    assert sorted(h.name for w in plan.waves for h in w) == sorted(h.name for h in hosts)
    # waves are cut to the number of racks left: 1, 2, 3, 4, then fewer
    assert [len(w) for w in plan.waves][:4] == [1, 2, 3, 4]


def test_spread_single_rack_left_fills_waves() -> None:
    hosts = racked({"r1": 20, "r2": 1})
    plan = make_plan(hosts, PlanOptions(spread="rack"))
    check_spread(plan.waves, 3)
    assert [len(w) for w in plan.waves] == [1, 2, 3, 4, 5, 6]


def test_spread_same_rack_name_in_two_buildings_is_two_domains() -> None:
    hosts = [
        Host("a", "h:1", ("eu", "b1", "r1")),
        Host("b", "h:2", ("eu", "b1", "r1")),
        Host("c", "h:3", ("eu", "b2", "r1")),
    ]
    plan = make_plan(hosts, PlanOptions(spread="rack"))
    assert [len(w) for w in plan.waves] == [1, 2]
    assert {h.location for h in plan.waves[1]} == {("eu", "b1", "r1"), ("eu", "b2", "r1")}
    by_building = make_plan(hosts, PlanOptions(spread="building"))
    check_spread(by_building.waves, 2)


def test_spread_large_fleet_with_empty_hosts_first() -> None:
    hosts = [
        Host(f"h{i}", f"10.0.0.1:{i + 1}", ("eu", "b1", f"r{i % 40}"), vms=0 if i % 7 else 2)
        for i in range(2000)
    ]
    plan = make_plan(hosts, PlanOptions(spread="rack", max_concurrency=30))
    check_spread(plan.waves, 3)
    flat = [h for w in plan.waves for h in w]
    assert len(flat) == 2000
    first_busy = next(i for i, h in enumerate(flat) if h.vms)
    assert all(h.vms for h in flat[first_busy:])
    assert max(len(w) for w in plan.waves) == 30


def test_unknown_spread_level() -> None:
    with pytest.raises(PlanError, match="unknown spread level"):
        make_plan(racked({"r1": 2}), PlanOptions(spread="row"))


def test_window_model() -> None:
    assert predict_window(0, 15) == 0
    assert predict_window(1, 15) == 15
    # with equal host times the window model takes as many host-times as the barrier one
    assert predict_window(100, 15) == 14 * 15
    assert predict_window(10, 1, max_concurrency=1) == 10


def test_format_duration() -> None:
    assert format_duration(2115) == "35m15s"
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(0.25) == "0.25s"
