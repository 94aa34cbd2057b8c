from __future__ import annotations

import re
from pathlib import Path

import pytest

from hatchery.api.policy import Policy, load_policy
from hatchery.config import AgentConfig, DhcpMode, load_config, parse_config
from hatchery.errors import ConfigError
from hatchery.pki import Identity

GOOD = {
    "state_dir": "/srv/h",
    "listen": "127.0.0.1:7000",
    "qemu": {"accel": "tcg"},
    "bridges": [
        {
            "name": "br0",
            "subnets": [
                {
                    "cidr": "10.1.0.0/24",
                    "gateway": "10.1.0.1",
                    "dns": ["10.1.0.1"],
                    "pool": {"start": "10.1.0.10", "end": "10.1.0.20"},
                }
            ],
        }
    ],
}


def test_minimal_config_is_all_defaults() -> None:
    assert parse_config(None) == AgentConfig()


def test_good_config() -> None:
    config = parse_config(GOOD)
    assert config.listen_port == 7000 and config.accel == "tcg"
    assert str(config.bridges[0].subnets[0].pool_end) == "10.1.0.20"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"listen": "nowhere"}, "listen: expected HOST:PORT"),
        ({"qemu": {"accel": "xen"}}, "qemu.accel: must be auto, kvm or tcg"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"capacity": {"reserve_cpus": -1}}, "capacity.reserve_cpus: must be >= 0"),
        ({"capacity": {"reserve_memory_mib": True}}, "capacity.reserve_memory_mib: expected int"),
        (
            {
                "bridges": [
                    {"name": "br0", "subnets": [{"cidr": "10.1.0.0/24", "gateway": "10.2.0.1"}]}
                ]
            },
            "bridges[0].subnets[0].gateway: 10.2.0.1 is outside 10.1.0.0/24",
        ),
        (
            {
                "bridges": [
                    {
                        "name": "br0",
                        "subnets": [
                            {
                                "cidr": "10.1.0.0/24",
                                "pool": {"start": "10.1.0.9", "end": "10.1.0.2"},
                            }
                        ],
                    }
                ]
            },
            "bridges[0].subnets[0].pool.end: 10.1.0.2 is before pool start 10.1.0.9",
        ),
        ({"bridges": [{"name": "a-name-that-is-too-long"}]}, "bridges[0].name"),
        ({"bridges": [{"name": "br0"}, {"name": "br0"}]}, "listed twice"),
    ],
)
def test_errors_name_the_bad_key(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**GOOD, **patch})
    assert message in err.value.message


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("listen: [1, 2\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_policy() -> None:
    policy = load_policy(None)
    admin = Identity("root", frozenset({"admin"}))
    ops = Identity("olga", frozenset({"ops"}))
    web = Identity("wendy", frozenset({"web"}))
    assert policy.allows(admin, "pool.manage")
    assert policy.allows(ops, "vm.manage") and not policy.allows(ops, "pool.manage")
    assert not policy.allows(web, "vm.manage")
    assert policy.allows(web, "vm.manage", owner_group="web")
    assert not policy.allows(web, "pool.manage", owner_group="web")
    assert Policy({"reader": ("*.read",)}).allows(Identity("r", frozenset({"reader"})), "vm.read")


def test_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("groups:\n  web: [vm.read]\n")
    assert load_policy(path).allows(Identity("w", frozenset({"web"})), "vm.read")
    path.write_text("groups: [1]\n")
    with pytest.raises(ConfigError, match="groups"):
        load_policy(path)


def test_connection_limits() -> None:
    config = parse_config({"limits": {"per_client": 8, "total": 100, "idle_timeout": 5}})
    assert config.limits.per_client == 8 and config.limits.total == 100
    assert config.limits.idle_timeout == 5.0
    assert config.limits.header_timeout == AgentConfig().limits.header_timeout


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"per_client": 0}, "limits.per_client"),
        ({"per_client": 10, "total": 5}, "limits.per_client"),
        ({"header_timeout": 0}, "limits.header_timeout"),
        ({"idle": 3}, "limits.idle"),
    ],
)
def test_bad_connection_limits_name_the_key(limits: dict[str, int], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_config({"limits": limits})


def test_vm_sources() -> None:
    config = parse_config({**GOOD, "vm_sources": {
        "folders": ["/data/artefacts"], "management_networks": ["10.0.0.0/24", "fd00::/64"],
        "max_download_bytes": 1024, "download_timeout": 30}})  # fmt: skip
    sources = config.vm_sources
    assert sources.folders == (Path("/data/artefacts"),)
    assert [str(n) for n in sources.management_networks] == ["10.0.0.0/24", "fd00::/64"]
    assert sources.max_download_bytes == 1024 and sources.download_timeout == 30
    assert parse_config(GOOD).vm_sources.max_download_bytes == 4 * 1024**3
    for bad, where in (({"folders": ["data"]}, "folders[0]"), ({"folders": ["/"]}, "folders[0]"),
                       ({"management_networks": ["nope"]}, "management_networks[0]"),
                       ({"max_download_bytes": 0}, "max_download_bytes"),
                       ({"typo": 1}, "vm_sources.typo")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(where)):
            parse_config({**GOOD, "vm_sources": bad})


def test_crl_path_has_one_default_beside_the_ca() -> None:
    assert parse_config({}).tls.crl == Path("/etc/hatchery/tls/crl.pem")
    assert parse_config({"tls": {"crl": "/x/crl.pem"}}).tls.crl == Path("/x/crl.pem")


def test_bridge_metadata_is_a_bool_or_a_mapping() -> None:
    def bridge(metadata: object) -> tuple[bool, bool]:
        b = parse_config({"bridges": [{"name": "br0", "metadata": metadata}]}).bridges[0]
        return b.metadata, b.metadata_require_token

    assert parse_config({"bridges": [{"name": "br0"}]}).bridges[0].metadata_require_token is False
    assert bridge(True) == (True, False)
    assert bridge(False) == (False, False)
    assert bridge({"require_token": True}) == (True, True)
    assert bridge({}) == (True, False)
    with pytest.raises(ConfigError, match=r"bridges\[0\]\.metadata\.require_tokens: unknown key"):
        bridge({"require_tokens": True})
    with pytest.raises(ConfigError, match=r"bridges\[0\]\.metadata\.require_token: expected bool"):
        bridge({"require_token": "yes"})


def test_only_admin_may_manage_the_pki() -> None:
    """``PUT /v1/pki/crl`` needs ``pki.manage``: in the default policy only ``admin`` has it."""
    policy = load_policy(None)
    assert policy.allows(Identity("root", frozenset({"admin"})), "pki.manage")
    for group in ("ops", "reader", "node", "web"):
        assert not policy.allows(Identity("x", frozenset({group})), "pki.manage"), group


def test_boot_dhcp_mode_defaults_to_full_and_may_be_proxy() -> None:
    def boot(section: dict[str, object]) -> dict[str, object]:
        return {"bridges": [{**GOOD["bridges"][0], "boot": section}]}  # type: ignore[index]

    full = parse_config(boot({"http_port": 8080})).bridges[0].boot
    assert full is not None and full.dhcp is DhcpMode.FULL
    proxy = parse_config(boot({"dhcp": "proxy"})).bridges[0].boot
    assert proxy is not None and proxy.dhcp is DhcpMode.PROXY
    with pytest.raises(ConfigError, match=re.escape("bridges[0].boot.dhcp: must be full or proxy")):
        parse_config(boot({"dhcp": "relay"}))
    births = {"start": "10.1.0.100", "end": "10.1.0.110"}
    assert parse_config(boot({"births": births})).bridges[0].boot is not None
    with pytest.raises(ConfigError, match=re.escape("bridges[0].boot.births.start: a births")):
        parse_config(boot({"dhcp": "proxy", "births": births}))


def test_boot_ipv6_births_are_validated_with_the_key_named() -> None:
    def boot(ipv6: object, **more: object) -> dict[str, object]:
        section = {"ipv6": ipv6, **more}
        return {"bridges": [{"name": "br6", "boot": section}]}

    births = {"start": "fd42::100", "end": "fd42::1ff"}
    v6 = parse_config(boot({"births": births})).bridges[0].boot
    assert v6 is not None and v6.ipv6 is not None
    assert str(v6.ipv6.prefix) == "fd42::/64" and not v6.ipv6.router  # the /64 of start
    assert v6.births_start is None  # an IPv6-only bridge: no IPv4 range needed
    full = parse_config(boot({"births": births, "prefix": "fd42::/48", "router": True,
                              "dns": ["fd42::53"], "lease_time": 600})).bridges[0].boot  # fmt: skip
    assert full is not None and full.ipv6 is not None
    assert full.ipv6.router and full.ipv6.lease_time == 600 and str(full.ipv6.dns[0]) == "fd42::53"
    where = "bridges[0].boot.ipv6"
    bad = [
        ({"births": {"start": "fd42::100"}}, f"{where}.births.start: IPv6 births need both"),
        ({"births": {"start": "10.0.0.1", "end": "fd42::1"}}, f"{where}.births.start: not an IPv6"),
        ({"births": {"start": "fd42::1ff", "end": "fd42::100"}}, f"{where}.births.end: fd42::100"),
        ({"births": births, "prefix": "fd43::/64"}, f"{where}.births.start: fd42::100-fd42::1ff"),
        ({"births": births, "prefix": "fd42::1/64"}, f"{where}.prefix: fd42::1/64 has host bits"),
        ({"births": {"start": "fe80::1", "end": "fe80::2"}}, f"{where}.prefix: fe80::/64 cannot"),
        ({"births": births, "dns": ["x"]}, f"{where}.dns: not an IPv6 address"),
        ({"births": births, "lease_time": 10}, f"{where}.lease_time: must be >= 60"),
        ({"births": births, "ranges": 1}, f"{where}.ranges: unknown key"),
    ]  # fmt: skip
    for section, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(boot(section))
    with pytest.raises(ConfigError, match=re.escape(f"{where}.births: IPv6 births give")):
        parse_config(boot({"births": births}, dhcp="proxy"))
