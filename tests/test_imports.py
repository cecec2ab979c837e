"""The package's import graph: no module of fastdqn imports another that (directly or not) imports it back, and
none imports fastdqn.cli but `fastdqn/__main__.py`, which runs it for `python -m fastdqn` (the command line sits
on top of the package; nothing builds on it).

Imports are read from the source with `ast`, at module level and inside functions alike, so an import cycle
hidden in a function body (one that only bites when that function runs) fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastdqn"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name of every module of `package` (its __init__ is the package's own name)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, one level up per extra dot
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub where there is one, else a name of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import fastdqn.x.y` imports fastdqn.x.y or its parent
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_names(package)
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> b -> ... -> a) per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [cycle_through(sorted(group), graph) for group in groups]


def cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A path from group[0] back to itself inside the group (breadth-first, so a shortest one)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {group}")


def cli_importers(graph: dict[str, set[str]], cli: str) -> list[str]:
    """Modules that import `cli`, other than the package's `__main__` (the command's own entry point)."""
    entry = cli.rpartition(".")[0] + ".__main__"
    return sorted(name for name, targets in graph.items() if cli in targets and name not in (cli, entry))


def test_fastdqn_has_no_import_cycle():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles in fastdqn: " + "; ".join(" -> ".join(c) for c in found)


def test_no_fastdqn_module_imports_the_cli():
    graph = import_graph(PACKAGE)
    assert "fastdqn.api" in graph["fastdqn.cli"] and "fastdqn.cli" in graph["fastdqn.__main__"]  # real imports
    assert cli_importers(graph, "fastdqn.cli") == []


def test_the_checks_find_a_cycle_inside_a_function_and_an_import_of_the_cli(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("from pkg import a\n")
    (pkg / "__main__.py").write_text("from pkg.cli import main\n")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def late():\n    from ..c import f\n    return f\n")
    (pkg / "c.py").write_text("def f():\n    from pkg import a, cli\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a", "pkg.cli"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    assert cli_importers(graph, "pkg.cli") == ["pkg.c"]
