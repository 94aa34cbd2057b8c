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
