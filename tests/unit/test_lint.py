"""Linters as tests, so ``make test`` is the whole check: ruff, mypy --strict, shellcheck."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"


def test_ruff_check() -> None:
    _run([str(BIN / "ruff"), "check", "."])


def test_ruff_format() -> None:
    _run([str(BIN / "ruff"), "format", "--check", "."])


def test_mypy_strict() -> None:
    _run([str(BIN / "mypy")])


def test_shellcheck(require_tool: Callable[[str], str]) -> None:
    shellcheck = require_tool("shellcheck")
    listed = subprocess.run(
        ["git", "ls-files", "*.sh", ".ci/run", "mkosi.*", "images/*"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    scripts = [p for p in listed if _is_shell(REPO / p)]
    assert scripts, "no shell scripts found: the listing is broken"
    _run([shellcheck, "--severity=style", *scripts])


def _is_shell(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        first = f.readline()
    return first.startswith(b"#!") and (b"sh" in first.split(b"/")[-1])
