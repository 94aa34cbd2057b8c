"""Agent answers are untrusted: parsing never crashes, only ValueError for a non-answer."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from hatchery_rollout.client import parse_health, parse_upgrade
from hatchery_rollout.progress import Progress

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "version": json_values | st.just("v2"),
        "checks": json_values,
        "vms": json_values,
        "upgrade": json_values,
        "boot": json_values,
        "healthy": json_values,
    },
)


@given(documents | json_values)
def test_parse_health_never_crashes(doc: Any) -> None:
    try:
        health = parse_health(doc)
    except ValueError:
        return
    assert isinstance(health.version, str)
    assert all(isinstance(n, str) for n in health.failing())
    parse_upgrade(doc)


def test_parse_health_reads_the_contract() -> None:
    health = parse_health(
        {
            "version": "v2",
            "healthy": False,
            "checks": {"agent": "ok", "units": "fail: x.service", "vms": "ok"},
            "vms": {"total": 3},
            "upgrade": {"state": "done", "target": "v2", "mode": "live", "error": None},
            "boot": {"fallback": True, "reason": "not marked good"},
        }
    )
    assert health.failing() == ("units",)
    assert health.detail(("units",)) == "units: fail: x.service"
    assert health.vms_total == 3 and health.fallback and health.upgrade.state == "done"


def test_progress_line_and_eta() -> None:
    out = io.StringIO()
    progress = Progress(10, 4, stream=out, tty=False)
    assert "ETA ?" in progress.line()
    progress.start_wave(0)
    progress.host_started()
    progress.host_started()
    progress.host_finished(True, 2.0)
    progress.render()
    assert "wave 1/4 · 1/10 done · 0 failed · 1 in flight" in out.getvalue()
    eta = progress.eta()  # no wave finished yet: rest of this wave + 3 waves at 2 s a host
    assert eta is not None and 6.0 <= eta <= 8.0
