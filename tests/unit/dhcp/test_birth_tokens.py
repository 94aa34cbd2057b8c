"""Birth tokens, the pure table: single-use, short-lived, bound to a MAC and an address."""

from __future__ import annotations

import ipaddress
import re

import pytest

from hatchery.boothttp.tokens import BirthTokens

MAC, OTHER = "52:54:00:aa:bb:01", "52:54:00:aa:bb:02"
IP, ELSEWHERE = ipaddress.IPv4Address("10.0.0.50"), ipaddress.IPv4Address("10.0.0.51")


def test_a_token_is_redeemed_once_by_its_address() -> None:
    tokens = BirthTokens(ttl=600)
    token = tokens.mint(MAC, IP, now=100.0)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)  # 32 random bytes: 256 bits
    grant = tokens.redeem(token, IP, now=101.0)
    assert grant is not None and (grant.mac, grant.ip) == (MAC, IP)
    assert tokens.redeem(token, IP, now=102.0) is None  # burnt
    assert len(tokens) == 0


def test_only_the_hash_is_kept() -> None:
    tokens = BirthTokens()
    token = tokens.mint(MAC, IP, now=0.0)
    kept = repr(vars(tokens))  # every grant, with its digest
    assert MAC in kept and token not in kept


def test_another_address_gets_nothing_and_burns_nothing() -> None:
    tokens = BirthTokens()
    token = tokens.mint(MAC, IP, now=0.0)
    assert tokens.redeem(token, ELSEWHERE, now=1.0) is None
    assert tokens.redeem(token, IP, now=2.0) is not None  # the probe did not deny the machine


def test_expired_unknown_and_malformed_tokens_get_nothing() -> None:
    tokens = BirthTokens(ttl=600)
    token = tokens.mint(MAC, IP, now=0.0)
    assert tokens.redeem(token, IP, now=600.0) is None  # expiry is exclusive
    for wrong in ("", "x", token[:-1], token + "A", token.upper(), "\udcff" * 43):
        assert tokens.redeem(wrong, IP, now=1.0) is None
    assert tokens.redeem(token, IP, now=599.9) is not None


def test_a_lease_no_longer_held_gets_nothing_and_keeps_the_token() -> None:
    tokens = BirthTokens()
    token = tokens.mint(MAC, IP, now=0.0)
    assert tokens.redeem(token, IP, now=1.0, still_bound=lambda g: False) is None
    assert tokens.redeem(token, IP, now=1.0, still_bound=lambda g: g.mac == MAC) is not None


def test_a_new_boot_replaces_the_machines_token() -> None:
    tokens = BirthTokens()
    first = tokens.mint(MAC, IP, now=0.0)
    other = tokens.mint(OTHER, ELSEWHERE, now=0.0)
    second = tokens.mint(MAC, IP, now=5.0)
    assert first != second and len(tokens) == 2
    assert tokens.redeem(first, IP, now=6.0) is None
    assert tokens.redeem(second, IP, now=6.0) is not None
    assert tokens.redeem(other, ELSEWHERE, now=6.0) is not None


def test_the_table_is_bounded() -> None:
    tokens = BirthTokens(ttl=10, capacity=3)
    minted = [tokens.mint(f"52:54:00:00:00:{i:02x}", IP, now=float(i)) for i in range(5)]
    assert len(tokens) == 3
    assert tokens.redeem(minted[0], IP, now=5.0) is None  # the oldest made room
    assert tokens.redeem(minted[4], IP, now=5.0) is not None
    tokens.mint(MAC, IP, now=100.0)  # every other token has expired by now: pruned
    assert len(tokens) == 1


def test_short_randomness_is_refused() -> None:
    tokens = BirthTokens(random_bytes=lambda n: b"\x00" * (n - 1))
    with pytest.raises(ValueError, match="random bytes"):
        tokens.mint(MAC, IP, now=0.0)
