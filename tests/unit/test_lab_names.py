"""Names of the lab's throwaway interfaces and namespaces (``hatchery_lab.net.unique_name``)."""

from __future__ import annotations

from hatchery_lab.net import unique_name


def test_one_process_never_repeats_a_name() -> None:
    """The storm bench alone makes 100 namespaces; with a random suffix only, two of them
    met in about one run of 13 and the bench died on ``ip netns add``."""
    names = [unique_name("hvm") for _ in range(4096)]
    assert len(set(names)) == len(names)


def test_names_fit_an_interface_name() -> None:
    assert all(len(unique_name(prefix)) <= 15 for prefix in ("hvm", "happ", "hlab"))
