"""Inventory parsing: the file form, the location tree, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hatchery_rollout.errors import InventoryError
from hatchery_rollout.inventory import load_fleet, parse_fleet


def test_file_form(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "levels: [region, building, rack]\n"
        "port: 7000\n"
        "hosts:\n"
        "  - {name: hv1, address: 10.0.0.1:6976, location: eu/fra1/r1, labels: {gpu: a100}}\n"
        "  - {name: hv2, address: 10.0.0.2, location: [eu, fra1, r2], vms: 0}\n"
        "  - {name: hv3, address: '[fd00::3]:6976'}\n"
    )
    fleet = load_fleet(path)
    assert [h.name for h in fleet.hosts] == ["hv1", "hv2", "hv3"]
    hv1, hv2, hv3 = fleet.hosts
    assert hv1.address == "10.0.0.1:6976" and hv1.location == ("eu", "fra1", "r1")
    assert hv1.label("gpu") == "a100"
    assert hv2.address == "10.0.0.2:7000" and hv2.vms == 0 and hv2.port == 7000
    assert hv3.host == "fd00::3" and hv3.port == 6976
    assert fleet.by_name["hv2"] is hv2


def test_tree_form(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text("levels: [region, building, rack, row]\n")
    r1 = tmp_path / "eu" / "fra1" / "r1"
    r1.mkdir(parents=True)
    (r1 / "hosts.yaml").write_text("- {name: a, address: 10.0.0.1}\n- {name: b, address: h2:1}\n")
    deep = tmp_path / "us" / "nyc" / "r9" / "row2"
    deep.mkdir(parents=True)
    (deep / "hosts.yaml").write_text("- {name: c, address: 10.0.0.3, vms: 4}\n")
    (tmp_path / "eu" / "hosts.yaml").write_text("- {name: d, address: 10.0.0.4}\n")
    fleet = load_fleet(tmp_path)
    by = {h.name: h for h in fleet.hosts}
    assert by["a"].location == ("eu", "fra1", "r1")
    assert by["c"].location == ("us", "nyc", "r9", "row2") and by["c"].vms == 4
    assert by["d"].location == ("eu",)
    assert fleet.levels == ("region", "building", "rack", "row")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"hosts": [{"name": "a", "address": "h:1", "colour": 1}]}, r"hosts\[0\]\.colour: unknown"),
        ({"hosts": [{"name": "a b", "address": "h:1"}]}, r"hosts\[0\]\.name"),
        ({"hosts": [{"name": "a"}]}, r"hosts\[0\]\.address"),
        ({"hosts": [{"name": "a", "address": "h:99999"}]}, r"hosts\[0\]\.address: bad port"),
        ({"hosts": [{"name": "a", "address": "h:1", "vms": -1}]}, r"hosts\[0\]\.vms"),
        ({"hosts": [{"name": "a", "address": "h:1", "labels": [1]}]}, r"hosts\[0\]\.labels"),
        ({"hosts": [{"name": "a", "address": "h:1", "location": 3}]}, r"hosts\[0\]\.location"),
        (
            {"hosts": [{"name": "a", "address": "h:1"}, {"name": "a", "address": "h:2"}]},
            "listed twice",
        ),
        ({"hosts": [{"name": "a", "address": "h:1"}, {"name": "b", "address": "h:1"}]}, "share"),
        (
            {"levels": ["rack"], "hosts": [{"name": "a", "address": "h:1", "location": "x/y"}]},
            "deeper than the levels",
        ),
        ({"hosts": {"a": 1}}, "hosts: expected a list"),
        ({"host": []}, "host: unknown key"),
        ({"port": "x", "hosts": []}, "port"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_errors_name_the_key(doc: object, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        parse_fleet(doc, "f.yaml")


def test_tree_rejects_location_key_and_bad_yaml(tmp_path: Path) -> None:
    r1 = tmp_path / "r1"
    r1.mkdir()
    (r1 / "hosts.yaml").write_text("- {name: a, address: h:1, location: x}\n")
    with pytest.raises(InventoryError, match=r"\[0\]\.location: set by the directory"):
        load_fleet(tmp_path)
    (r1 / "hosts.yaml").write_text("- {name: a, address: [\n")
    with pytest.raises(InventoryError, match="not valid YAML"):
        load_fleet(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="no such file"):
        load_fleet(tmp_path / "nope.yaml")
