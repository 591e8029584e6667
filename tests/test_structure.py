"""The shape of the package: no import cycles, no private names across
modules, every socket in one module, every thread in the architecture's table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "hctserver"


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py"))}


def package_imports(name: str, tree: ast.Module) -> set[str]:
    """Modules of the package that ``name`` imports, anywhere in it (inside
    functions and TYPE_CHECKING blocks too: a cycle there is still a cycle)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hctserver"):
            parts = (node.module or "").split(".")
            out.update(parts[1:2] or [a.name for a in node.names])
    return {m for m in out if (PKG / f"{m}.py").exists() and m != name}


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
    graph = {name: package_imports(name, tree) for name, tree in modules().items()}
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
    # peer of the replication protocol; security builds ssl contexts only
    assert users == {"transport", "httpserver", "etcd", "security"}
    security = ast.dump(modules()["security"])
    assert "socket" not in security and "selectors" not in security


def test_every_thread_is_in_the_architectures_table() -> None:
    names = set()
    for p in PKG.glob("*.py"):
        for m in re.finditer(r'spawn\(\s*f?"(hct-[a-z-]+)', p.read_text()):
            names.add(m.group(1).rstrip("-"))
    assert len(names) >= 8, names
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = doc[doc.index("## Threads") :]
    missing = [n for n in sorted(names) if f"`{n}" not in table]
    assert not missing, f"threads missing from the table in docs/ARCHITECTURE.md: {missing}"
