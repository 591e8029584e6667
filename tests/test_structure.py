"""The shape of the package: no import cycles, no private names across
modules, every socket in one module, every thread in the architecture's table."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import grimp

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "hctserver"


def modules() -> dict[str, ast.Module]:
    """Every module of the package by its name (names are unique across the
    subpackages; their ``__init__`` files hold only a docstring)."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        if p.stem == "__init__" and p.parent != PKG:
            assert not ast.parse(p.read_text()).body[1:], f"{p}: a docstring only"
            continue
        assert p.stem not in out, f"two modules named {p.stem}"
        out[p.stem] = ast.parse(p.read_text(), str(p))
    return out


def package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in it (inside
    functions and TYPE_CHECKING blocks too: a cycle there is still a cycle)."""
    graph = grimp.build_graph("hctserver", cache_dir=None)
    return {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}


# top to bottom; a layer imports only from itself and the layers below it
# (the same contract as [tool.importlinter] in pyproject.toml, which CI runs)
LAYERS = (
    "hctserver.tools",
    "hctserver.cluster",
    "hctserver.node",
    "hctserver.client",  # drivers and forwarding: what a node and an application use
    ("hctserver.net", "hctserver.protocol"),  # side by side, neither importing the other
    "hctserver.journal",
)


def illegal_imports(graph: grimp.ImportGraph) -> set[Any]:
    layers = [grimp.Layer(*x) if isinstance(x, tuple) else grimp.Layer(x) for x in LAYERS]
    return graph.find_illegal_dependencies_for_layers(layers=layers)


def test_lower_layers_never_import_upper_ones() -> None:
    graph = grimp.build_graph("hctserver", cache_dir=None)
    bad = illegal_imports(graph)
    assert not bad, [(d.importer, d.imported, d.routes) for d in bad]
    roots = {m for m in graph.modules if m.count(".") == 1 and m != "hctserver.__main__"}
    for m in roots - {"hctserver.tools", "hctserver.cluster", "hctserver.node", "hctserver.net",
                      "hctserver.protocol", "hctserver.journal", "hctserver.client"}:  # fmt: skip
        ups = {i.split(".")[1] for i in graph.find_modules_directly_imported_by(m)} - {
            "errors", "faults", "position", "version", "speedups"}  # fmt: skip
        assert not ups, f"{m}, a root module, imports from {ups}"


def test_the_layer_check_can_fail() -> None:
    graph = grimp.build_graph("hctserver", cache_dir=None)
    graph.add_import(importer="hctserver.journal.store", imported="hctserver.node.leader")
    graph.add_import(importer="hctserver.net.transport", imported="hctserver.protocol.wire")
    bad = {(d.importer, d.imported) for d in illegal_imports(graph)}
    assert ("hctserver.journal", "hctserver.node") in bad
    assert ("hctserver.net", "hctserver.protocol") in bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = package_imports()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def private_uses(tree: ast.Module) -> list[str]:
    """Private names used across modules: imported from another module, or
    read off an object other than self/cls (or a class being defined here)."""
    local_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += [
                f"import {a.name}"
                for a in node.names
                if _private(a.name) and node.module != "__future__"
            ]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and (
                base.id in ("self", "cls") or base.id in local_classes
            ):
                continue
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_names_cross_modules() -> None:
    bad = {name: uses for name, tree in modules().items() if (uses := private_uses(tree))}
    assert not bad, bad


def test_the_private_name_check_can_fail() -> None:
    assert private_uses(ast.parse("from .journal import _INSERT\nx = db._hooks\n")) == [
        "import _INSERT",
        "line 2: ._hooks",
    ]
    assert private_uses(ast.parse("class A:\n    def f(self):\n        return self._x\n")) == []


def test_every_socket_lives_in_the_transport_module() -> None:
    users = {
        name
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if (
            isinstance(node, ast.Import)
            and any(a.name in ("socket", "ssl", "selectors") for a in node.names)
        )
        or (isinstance(node, ast.ImportFrom) and node.module in ("socket", "ssl", "selectors"))
    }
    # the HTTP endpoint is a server on a port of its own (it wraps its sockets
    # in TLS itself); etcd's client speaks HTTP(S) to etcd alone, never to a
    # peer of the replication protocol; the HTTP client speaks to a node's
    # HTTP endpoint (SQL clients, forwarded writes); security builds ssl contexts only
    assert users == {"transport", "httpserver", "httpclient", "etcd", "security"}
    security = ast.dump(modules()["security"])
    assert "socket" not in security and "selectors" not in security


def test_every_thread_is_in_the_architectures_table() -> None:
    names = set()
    for p in PKG.rglob("*.py"):
        for m in re.finditer(r'spawn\(\s*f?"(hct-[a-z-]+)', p.read_text()):
            names.add(m.group(1).rstrip("-"))
    assert len(names) >= 8, names
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = doc[doc.index("## Threads") :]
    missing = [n for n in sorted(names) if f"`{n}" not in table]
    assert not missing, f"threads missing from the table in docs/ARCHITECTURE.md: {missing}"
