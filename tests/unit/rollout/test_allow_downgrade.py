"""``hatchery-rollout run --allow-downgrade``: sent to every host, and kept in the journal
so that a resumed rollout sends it too (issue 14: agents refuse an older version unless
the request allows it)."""

from __future__ import annotations

from hatchery_rollout.cli import _exec_options, _parser
from hatchery_rollout.executor import ExecOptions

RUN = ["run", "--fleet", "fleet.yaml", "--version", "v1"]


def test_the_flag_reaches_the_request_and_survives_a_resume() -> None:
    options = _exec_options(_parser().parse_args([*RUN, "--allow-downgrade"]))
    assert options.request().to_json() == {"version": "v1", "mode": "live",
                                           "allow_downgrade": True}  # fmt: skip
    resumed = ExecOptions.from_json("v1", options.to_json())
    assert resumed.allow_downgrade and resumed == options


def test_without_the_flag_no_downgrade_is_asked_for() -> None:
    options = _exec_options(_parser().parse_args(RUN))
    assert "allow_downgrade" not in options.request().to_json()
    assert not ExecOptions.from_json("v1", options.to_json()).allow_downgrade
    assert not ExecOptions.from_json("v1", {}).allow_downgrade  # a journal from before
