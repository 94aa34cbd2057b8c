"""``make demo``: Hatchery's whole story in one run (see hatchery_lab/story.py).

Builds (or reuses) images v1 and v2, boots node A from v1, PXE-births node B from A, runs an
appliance VM on B through the API, and rolls A and B to v2 with hatchery-rollout while the
VM keeps running — all on a lab bridge it creates and removes. Prints each step's progress
and a summary; consoles and logs stay in the work folder.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from hatchery.qemu.accel import choose_accel
from hatchery_lab import REPO
from hatchery_lab.story import run_story


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stamp = time.strftime("%Y%m%dT%H%M%S")
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / f"demo-run-{stamp}")
    args = parser.parse_args()
    # SIGTERM (a timeout, an operator) unwinds like Ctrl-C: guests, taps and bridges go away.
    signal.signal(signal.SIGTERM, _interrupt)
    choice = choose_accel()
    print(f"QEMU accelerator: {choice.accel} ({choice.reason})")
    try:
        run_story(args.workdir.resolve())
    except KeyboardInterrupt:
        print(f"\ndemo interrupted; cleaned up. logs and consoles: {args.workdir}", file=sys.stderr)
        return 130
    except Exception as exc:  # the demo's one exit point: one line, and where the logs are
        print(f"\ndemo failed: {exc}\nlogs and consoles: {args.workdir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
