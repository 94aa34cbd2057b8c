"""One logging set-up for every Hatchery program: plain lines, %-style, DEBUG with --debug."""

from __future__ import annotations

import logging
import sys


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pyroute2 and qemu.qmp narrate every message at DEBUG: keep them to warnings.
    for noisy in ("pyroute2", "qemu.qmp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
