"""The import graph, read from the sources with `ast` (nothing is imported to check it).

- the client's modules form no cycle (service.py is the root, platform/ the leaves);
- the client and the protocol reach no server code and no server dependency;
- the domain services import no Flask (HTTP is mapped to in one place, outside them);
- nothing in wcms imports wcms.client.service, the Windows service's composition root.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
SERVER_ONLY = ("flask", "sqlalchemy", "alembic", "gunicorn", "gevent", "wcms.server")

Graph = Mapping[str, set[str]]


# ---------------------------------------------------------------------------- the reader


def module_files(root: Path, package: str = "wcms") -> dict[str, Path]:
    """Every module of `package` under `root` (a src dir), by dotted name."""
    found: dict[str, Path] = {}
    for path in sorted((root / package.replace(".", "/")).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that runs (at import or in a call): `if TYPE_CHECKING:` bodies left out."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(source: str, module: str, is_package: bool, known: Iterable[str] = ()) -> set[str]:
    """The modules `source` imports at run time, module-level and inside functions alike.

    `from X import Y` counts as an import of X.Y when X.Y is a module in `known`, else of X.
    """
    modules = set(known)
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                found.add(name if name in modules else base)
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """wcms module -> the modules it imports (wcms's own and third-party)."""
    files = module_files(root)
    return {
        name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", files)
        for name, path in files.items()
    }


# ---------------------------------------------------------------------------- the checks


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None; edges to modules not in `graph` are ignored."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        todo = [iter(sorted(graph[start]))]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                todo.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            elif nxt in graph and nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                todo.append(iter(sorted(graph[nxt])))
    return None


def reachable(graph: Graph, starts: Iterable[str]) -> set[str]:
    """The modules of `graph` that `starts` import, directly or not (starts included)."""
    seen: set[str] = set()
    todo = [s for s in starts if s in graph]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(n for n in graph[name] if n in graph)
    return seen


def forbidden_imports(
    graph: Graph, modules: Iterable[str], banned: Iterable[str]
) -> list[tuple[str, str]]:
    """(module, import) for each import of a `banned` package by one of `modules`."""
    bans = tuple(banned)
    return sorted(
        (module, name)
        for module in modules
        for name in graph.get(module, ())
        if any(within(name, ban) for ban in bans)
    )


def importers_of(graph: Graph, target: str) -> list[str]:
    return sorted(m for m, names in graph.items() if target in names)


def subgraph(graph: Graph, package: str) -> dict[str, set[str]]:
    return {
        m: {n for n in names if within(n, package)}
        for m, names in graph.items()
        if within(m, package)
    }


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


# ---------------------------------------------------------------------------- the rules


def test_the_client_imports_form_a_tree(graph: dict[str, set[str]]) -> None:
    client = subgraph(graph, "wcms.client")
    assert len(client) > 10  # the reader found the client
    cycle = find_cycle(client)
    assert cycle is None, "import cycle in the client: " + " -> ".join(cycle or ())


def test_the_client_and_the_protocol_reach_no_server_code(graph: dict[str, set[str]]) -> None:
    starts = [m for m in graph if within(m, "wcms.client") or m == "wcms.protocol"]
    shipped = reachable(graph, starts)
    assert {"wcms.protocol", "wcms.client.service", "wcms.bundle.verify"} <= shipped
    bad = forbidden_imports(graph, shipped, SERVER_ONLY)
    assert not bad, "the client reaches server-only code: " + ", ".join(
        f"{m} imports {n}" for m, n in bad
    )


def test_the_domain_services_import_no_flask(graph: dict[str, set[str]]) -> None:
    services = [m for m in graph if within(m, "wcms.server.services")]
    assert len(services) > 5
    bad = forbidden_imports(graph, services, ["flask", "werkzeug"])
    assert not bad, "Flask in the domain services: " + ", ".join(f"{m} imports {n}" for m, n in bad)


def test_nothing_imports_the_windows_service(graph: dict[str, set[str]]) -> None:
    assert "wcms.client.service" in graph
    importers = importers_of(graph, "wcms.client.service")
    assert not importers, f"wcms.client.service is imported by {', '.join(importers)}"


# ---------------------------------------------------------------------------- the checker itself


def test_find_cycle_on_a_synthetic_graph() -> None:
    tree = {"a": {"b", "c"}, "b": {"d"}, "c": {"d", "outside"}, "d": set()}
    assert find_cycle(tree) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    looped = {**tree, "d": {"e"}, "e": {"b"}}
    cycle = find_cycle(looped)
    assert cycle == ["b", "d", "e", "b"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set(), **looped}) is not None


def test_the_reader_sees_every_kind_of_import() -> None:
    source = """
from __future__ import annotations
import os, flask
from typing import TYPE_CHECKING
from wcms.client import http, CLIENT_VERSION
from . import config
from .platform.base import Platform
if TYPE_CHECKING:
    from wcms.server.models import PcInfo
def later():
    from wcms.client import service
"""
    known = {"wcms.client", "wcms.client.http", "wcms.client.service", "wcms.client.config"}
    found = imports_of(source, "wcms.client.main", False, known)
    assert found == {
        "__future__",
        "os",
        "flask",
        "typing",
        "wcms.client.http",
        "wcms.client",
        "wcms.client.config",
        "wcms.client.platform.base",
        "wcms.client.service",
    }
    assert imports_of("from . import x", "wcms.client", True, {"wcms.client.x"}) == {
        "wcms.client.x"
    }
    assert imports_of("from ..protocol import A", "wcms.client.main", False) == {"wcms.protocol"}


def test_each_rule_can_fail() -> None:
    """The rules, on a graph with one of each thing they forbid."""
    bad: dict[str, set[str]] = {
        "wcms.client.main": {"wcms.client.http", "wcms.bundle.verify"},
        "wcms.client.http": {"wcms.client.service"},
        "wcms.client.service": {"wcms.client.main"},
        "wcms.bundle.verify": {"sqlalchemy.orm"},
        "wcms.protocol": {"flask"},
        "wcms.server.services.pcs": {"flask"},
        "wcms.server.api": {"flask", "wcms.server.services.pcs"},
    }
    assert find_cycle(subgraph(bad, "wcms.client")) is not None
    shipped = reachable(bad, ["wcms.client.main", "wcms.protocol"])
    assert forbidden_imports(bad, shipped, SERVER_ONLY) == [
        ("wcms.bundle.verify", "sqlalchemy.orm"),
        ("wcms.protocol", "flask"),
    ]
    assert forbidden_imports(bad, ["wcms.server.services.pcs"], ["flask"]) != []
    assert importers_of(bad, "wcms.client.service") == ["wcms.client.http"]
