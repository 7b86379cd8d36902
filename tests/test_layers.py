"""The import graph between the repository's top-level packages, read from the source with ``ast``.

Every ``import`` and ``from ... import`` in every ``.py`` file of a package counts, also those inside
functions (a lazy import is still a dependency): the package graph must have no cycle, and ``paths`` (the
repository layout) imports no other package. The container image must hold every package that the
modules it runs import when they load.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from dockerfile_support import runtime_stage

from paths import REPO_ROOT

NOT_PACKAGES = {"tests", "build", "docs", "data", "deploy", "examples"}


def top_level_packages(root: Path = REPO_ROOT) -> set[str]:
    """Folders at the root that hold Python code run as part of a package (``__init__.py``, or ``scripts``
    run as ``python -m scripts.x``), hidden folders and the tests excluded."""
    return {
        d.name for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and d.name not in NOT_PACKAGES
        and ((d / "__init__.py").is_file() or (d.name == "scripts" and any(d.glob("*.py"))))
    }


def imported_modules(tree: ast.AST, module: str, *, module_level_only: bool = False) -> list[tuple[str, int]]:
    """(absolute module name, line) of each import in ``tree``; relative imports are resolved against
    ``module``. ``module_level_only`` leaves out imports inside functions (those run only when called)."""
    found = []
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # module-level statements, including those nested in if/try/with blocks
        stack, nodes = list(tree.body), []
        while stack:
            node = stack.pop()
            nodes.append(node)
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                stack.extend(ast.iter_child_nodes(node))
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return found


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_graph(root: Path = REPO_ROOT) -> dict[str, dict[str, list[str]]]:
    """package → {imported package: ["file:line", ...]} over every ``.py`` file of every top-level package."""
    packages = top_level_packages(root)
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in packages}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, line in imported_modules(tree, module_name(path, root)):
                target = name.split(".")[0]
                where = f"{path.relative_to(root)}:{line}"
                if target in packages and target != package and where not in graph[package].get(target, []):
                    graph[package].setdefault(target, []).append(where)
    return graph


def find_cycle(edges: dict[str, set[str]] | dict[str, dict]) -> list[str] | None:
    """One cycle of the directed graph (its nodes in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    """Control: the check below is not vacuous."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_is_read_from_the_source(tmp_path):
    """Control on a made-up tree: absolute, relative, ``from x import y`` and function-level imports all count."""
    for package, source in {
        "alpha": "from beta import thing\n",
        "beta": "def f():\n    import gamma.sub\n",
        "gamma": "from . import sub\nfrom .sub import x\nimport os\n",
    }.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(source)
    (tmp_path / "gamma" / "sub.py").write_text("from alpha import y\n")
    graph = package_graph(tmp_path)
    assert {p: set(e) for p, e in graph.items()} == {"alpha": {"beta"}, "beta": {"gamma"}, "gamma": {"alpha"}}
    assert graph["gamma"]["alpha"] == ["gamma/sub.py:1"]
    assert find_cycle(graph) == ["alpha", "beta", "gamma", "alpha"]


def test_no_import_cycle_between_packages():
    graph = package_graph()
    assert {"models", "train", "serve", "handlers", "client", "bench", "paths"} <= set(graph)
    assert "models" in graph["train"] and "models" in graph["handlers"], "the graph reads real imports"
    cycle = find_cycle(graph)
    if cycle:
        evidence = "; ".join(f"{a} -> {b} ({', '.join(graph[a][b][:3])})" for a, b in zip(cycle, cycle[1:]))
        pytest.fail(f"import cycle between packages {' -> '.join(cycle)}: {evidence}")


def test_paths_imports_no_other_package():
    """``paths`` is the neutral home every layer may import: it must depend on none of them."""
    assert package_graph()["paths"] == {}


def module_closure(modules: list[str], root: Path = REPO_ROOT) -> set[str]:
    """Every repository module loaded when ``modules`` are imported (module-level imports, transitively,
    with each parent package's ``__init__``)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            candidates = [root.joinpath(*parts[:i]).with_suffix(".py"), root.joinpath(*parts[:i], "__init__.py")]
            source = next((c for c in candidates if c.is_file()), None)
            if source is None or prefix in seen:
                continue
            seen.add(prefix)
            tree = ast.parse(source.read_text())
            todo += [m for m, _ in imported_modules(tree, module_name(source, root), module_level_only=True)]
    return seen


def test_the_image_holds_every_package_its_python_modules_import():
    """deploy/docker/entrypoint.sh runs ``python -m <module>`` from APP_DIR: each package those modules
    import as they load is COPYed into APP_DIR by the Dockerfile's runtime stage."""
    runtime = runtime_stage()
    env = dict(pair.split("=", 1) for ins, args in runtime if ins == "ENV" for pair in args.split())
    copied = {args.split()[-1].rstrip("/") for ins, args in runtime if ins == "COPY"}
    entrypoint = (REPO_ROOT / "deploy" / "docker" / "entrypoint.sh").read_text()
    run = sorted({m for m in re.findall(r"-m\s+([A-Za-z_][\w.]*)", entrypoint)
                  if m.split(".")[0] in top_level_packages()})
    assert run, "the entrypoint runs at least one of the repository's modules (serve)"
    needed = {name.split(".")[0] for name in module_closure(run)}
    missing = sorted(p for p in needed if f"{env['APP_DIR']}/{p}" not in copied)
    assert not missing, f"{run} import {missing}, which the runtime stage does not COPY into {env['APP_DIR']}"
