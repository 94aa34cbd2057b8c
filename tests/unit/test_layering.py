"""The agent's layering, read from its imports (the map is in docs/development.md).

Every next feature touches the shape between packages; these rules keep it from drifting:
the VM core knows nothing of the API, upgrades or images; the network servers know nothing
of the agent's wiring; one package speaks HTTP to operators; no import cycle anywhere.
Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent" / "hatchery"
SERVERS = ("dhcp", "dhcp6", "tftp", "boothttp", "metadata")
WIRING = ("hatchery.agent", "hatchery.agent_main", "hatchery.api", "hatchery.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(AGENT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Absolute names imported at run time anywhere in the module (functions included)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            yield prefix
            yield from (f"{prefix}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in AGENT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {
            imported
            for imported in _imports(tree, name, is_package)
            if imported in modules and imported != name
        }
    return graph


GRAPH = _graph()


def _violations(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[1:2] and module.split(".")[1] in packages
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )


def test_the_graph_is_read() -> None:
    assert "hatchery.vms.manager" in GRAPH and "hatchery.agent" in GRAPH
    assert any(t.startswith("hatchery.vms") for t in GRAPH["hatchery.agent"])


def test_vms_knows_nothing_of_api_upgrades_or_images() -> None:
    forbidden = ("hatchery.api", "hatchery.upgrade", "hatchery.images")
    assert _violations(("vms",), forbidden) == []


@pytest.mark.parametrize("package", ["images", "vms", "qemu", "tftp", "dhcp", "upgrade"])
def test_lower_packages_do_not_import_the_api(package: str) -> None:
    assert _violations((package,), ("hatchery.api",)) == []


@pytest.mark.parametrize("server", SERVERS)
def test_servers_import_no_agent_wiring(server: str) -> None:
    assert _violations((server,), WIRING) == []


def test_only_api_and_the_servers_import_aiohttp_web() -> None:
    allowed = {"api", "listener", *SERVERS}
    offenders = []
    for path in AGENT.rglob("*.py"):
        module = _module_name(path)
        package = module.split(".")[1] if module.count(".") else ""
        names = set(_imports(ast.parse(path.read_text()), module, path.name == "__init__.py"))
        if names & {"aiohttp.web", "aiohttp.web_request", "aiohttp.web_response"} or any(
            n.startswith("aiohttp.web.") for n in names
        ):
            if package not in allowed:
                offenders.append(module)
    assert offenders == []


def test_no_import_cycle() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_one_link_index() -> None:
    """Interface lookups by name exist once (netdev), not once per module that needs one."""
    lookups = ("_index", "link_index", "interface_mac", "_interface_mac")
    defined = sorted(
        f"{path.relative_to(AGENT)}:{node.name}"
        for path in AGENT.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name in lookups
    )
    assert defined == ["netdev.py:interface_mac", "netdev.py:link_index"]


def test_no_test_module_imports_another() -> None:
    """Shared test helpers live in tests/support (or the lab), never in a test module."""
    tests = AGENT.parents[1] / "tests"
    offenders = sorted(
        f"{path.relative_to(tests)} imports {name}"
        for path in tests.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module
        for name in [node.module]
        if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")
    )
    assert offenders == []
