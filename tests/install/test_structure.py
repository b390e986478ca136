"""The package's shape: no import circle (imports inside functions count too: deferring an import hides
a circle, it does not remove it), no underscore-private name imported from another module, no source
file over 600 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "densessl"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> list[tuple[str, str]]:
    """(imported densessl module, imported name or "") for every import statement of ``path``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:  # `from package import module`
                    found.append((target, ""))
                elif base in modules:
                    found.append((base, alias.name))
    return found


def package_graph() -> tuple[dict[str, set[str]], list[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    private = []
    for name, path in files.items():
        for target, imported in imports(path, set(files)):
            if target == name:
                continue
            # A package's __init__ re-exporting its own modules, and a module importing its package, are
            # Python's normal layering, not circles between modules.
            if not (name.startswith(target + ".") or target.startswith(name + ".")):
                graph[name].add(target)
            if imported.startswith("_"):
                private.append(f"{name} imports {target}.{imported}")
    return graph, private


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt, path + [nxt])):
                return circle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start, [start])):
            return circle
    return None


def test_no_import_circle() -> None:
    circle = find_circle(package_graph()[0])
    assert circle is None, " -> ".join(circle)


def test_the_circle_finder_sees_a_deferred_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_circle(graph) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_imported_across_modules() -> None:
    assert package_graph()[1] == []


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_source_file_is_at_most_600_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 600
