"""The agent's shape, checked from its imports (issue 13, "one shape for the agent").

One HTTP layer: only ``api/`` serves the agent's API, so only it (and the servers with
listeners of their own, boot HTTP and metadata) may import ``aiohttp.web``; the image store
knows nothing of the API that exposes it. Parsing the source (not importing it) keeps this
fast and free of side effects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "agent" / "hatchery"
WEB_SERVERS = ("api", "boothttp", "metadata")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, with ``from X import y`` giving both X and X.y."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules() -> list[Path]:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50, "the package was not found: the walk is broken"
    return modules


def test_only_the_servers_import_aiohttp_web() -> None:
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in _modules()
        if "aiohttp.web" in _imports(path) and path.relative_to(PACKAGE).parts[0] not in WEB_SERVERS
    ]
    assert offenders == []


@pytest.mark.parametrize("package", ["images", "vms", "qemu", "tftp", "dhcp", "upgrade"])
def test_lower_packages_do_not_import_the_api(package: str) -> None:
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in sorted((PACKAGE / package).rglob("*.py"))
        if any(
            name == "hatchery.api" or name.startswith("hatchery.api.") for name in _imports(path)
        )
    ]
    assert offenders == []


def test_one_link_index() -> None:
    defined = [
        str(path.relative_to(PACKAGE))
        for path in _modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name in ("_index", "link_index")
    ]
    assert defined == ["netdev.py"]
