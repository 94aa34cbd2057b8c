"""The progress line the rollout prints, and its estimate of the time left."""

from __future__ import annotations

import io

from hatchery_rollout.progress import Progress


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
