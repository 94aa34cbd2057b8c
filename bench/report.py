"""Write one benchmark's section into docs/benchmarks.md, leaving the others untouched.

Each section sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` so benchmarks
can be re-run one at a time.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Measured by `make bench` (or `python -m bench NAME`) on the machine named in each section.
Machines are shared and noisy: compare the ratios measured side by side in one run, not the
absolute figures across sections. Never edited by hand.
"""


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    return f"{platform.node() or 'host'}: {cpu}, {cores} cores, Linux {platform.release()}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


RESAMPLES = 2000  # bootstrap resamples behind ``paired_ratio``'s interval


@dataclass(frozen=True)
class PairedRatio:
    """Ours against a reference, run by run: the median of the per-pair ratios, a 95 %
    bootstrap interval of that median, and how many pairs ours won.

    Why pairs: on a shared machine the load drifts within a run by more than the difference
    being measured. Two runs made back to back see nearly the same load, so their ratio
    cancels most of it; the interval says what the run can resolve, and a ratio whose
    interval holds 1.0 is parity as far as this machine can tell.
    """

    median: float
    low: float
    high: float
    wins: int
    pairs: int

    def __str__(self) -> str:
        return (f"{self.median:.2f}x (95 % interval {self.low:.2f}–{self.high:.2f}; ours "
                f"ahead in {self.wins} of {self.pairs} pairs)")  # fmt: skip


def paired_ratio(ours: Sequence[float], reference: Sequence[float]) -> PairedRatio:
    """``ours[i] / reference[i]`` (rates: above 1, ours is faster) summarised as above. The
    bootstrap's generator is seeded, so one run's figures are reproducible from its data."""
    if len(ours) != len(reference) or not ours:
        raise ValueError("paired_ratio needs two series of one length, at least one pair")
    ratios = [a / b for a, b in zip(ours, reference, strict=True)]
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(RESAMPLES)
    )  # fmt: skip
    tail = int(RESAMPLES * 0.025)  # 2.5 % each side: the 95 % interval
    return PairedRatio(statistics.median(ratios), medians[tail - 1], medians[-tail - 1],
                       sum(r > 1 for r in ratios), len(ratios))  # fmt: skip


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"_{stamp}, commit {commit or 'uncommitted'}, {machine()}_\n\n{body.strip()}\n"
        f"<!-- /bench:{name} -->"
    )
    text = DOC.read_text() if DOC.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start in text and end in text:
        before = text.split(start, 1)[0]
        after = text.split(end, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)
