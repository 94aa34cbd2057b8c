"""``vms.status_port``: only the init's own lines count, whatever else the guest writes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hatchery.vms.status_port import RING_BYTES, STATUS_LINE, last_status, qemu_args


def test_the_last_valid_line_wins_and_garbage_is_ignored() -> None:
    assert last_status(b"") == (None, b"")
    assert last_status(b"started\nexited 3\ngarbage \xff\n") == ("exited 3", b"")
    assert last_status(b"started\r\n") == ("started", b"")
    assert last_status(b"exited 1234\nstarted; rm -rf /\n") == (None, b"")


def test_an_unfinished_line_waits_for_the_next_read() -> None:
    found, carry = last_status(b"started\nexi")
    assert (found, carry) == ("started", b"exi")
    assert last_status(carry + b"ted 0\n") == ("exited 0", b"")
    assert last_status(b"x" * 5000) == (None, b"")  # a flood is not carried


def test_the_ring_is_a_bounded_chardev_and_the_guest_s_power_off_waits_for_the_agent() -> None:
    args = " ".join(qemu_args())
    assert f"ringbuf,id=status,size={RING_BYTES}" in args
    assert "file," not in args
    assert "-action shutdown=pause" in args
    assert RING_BYTES & (RING_BYTES - 1) == 0  # QEMU wants a power of two


@settings(max_examples=400)
@given(st.binary(max_size=RING_BYTES + 64), st.binary(max_size=32))
def test_fuzz_any_bytes_give_a_valid_line_or_none(data: bytes, carry: bytes) -> None:
    found, rest = last_status(carry + data)
    assert found is None or STATUS_LINE.fullmatch(found)
    assert len(rest) <= 16 and b"\n" not in rest
