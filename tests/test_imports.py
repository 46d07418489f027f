"""The house's import rules, checked on every module's source (lazy imports included).

Rooms from the ground up: histoseek < training < export < server < demo < benchmarks <
histoseek_cli. A module imports only its own room or lower ones; inside `server/` the
Triton client < index < search core < slides < api. No module imports one that imports it
back (no cycle of any length), nothing imports the command line, and `server/`, `demo/` and
the ground never import torch or `training/`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["histoseek", "training", "export", "server", "demo", "benchmarks", "histoseek_cli"]
SERVER_CLIENT = {"server.triton", "server.embedder"}
SERVER_ROOMS = ["server.index", "server.slides", "server.api"]
TORCH_FREE = ("histoseek", "server", "demo")
TORCH = {"torch", "torchvision", "timm", "lightly", "open_clip", "pytorch_metric_learning", "transformers"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every absolute module name the file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from package import submodule` imports the submodule, not names of the package.
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & MODULES.keys()
            names.update(submodules)
            if len(submodules) < len(node.names):
                names.add(node.module)
    return names


def _project_imports(module: str) -> set[str]:
    return {name for name in _imports(MODULES[module]) if name in MODULES and name != module}


GRAPH = {module: _project_imports(module) for module in MODULES}


def _rank(module: str) -> tuple[int, int]:
    top = module.split(".")[0]
    inner = 0
    if top == "server":
        if module in SERVER_CLIENT:
            inner = 0
        else:
            rooms = [i for i, room in enumerate(SERVER_ROOMS) if module == room or module.startswith(room + ".")]
            # index 1, core (top-level modules) 2, slides 3, api 4
            inner = {0: 1, 1: 3, 2: 4}[rooms[0]] if rooms else 2
    return PACKAGES.index(top), inner


def test_the_walk_sees_the_whole_house():
    assert {"server.api.app", "server.index.folder", "server.slides.search", "histoseek_cli.main"} <= set(MODULES)
    assert "server.index.folder" in GRAPH["server.search"]


def test_no_module_imports_a_higher_room():
    upward = [f"{m} -> {n}" for m, names in GRAPH.items() for n in names if n != "server" and _rank(n) > _rank(m)
              and not n.startswith(m + ".")]
    assert not upward, "imports from a lower room to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    # Tarjan's strongly connected components; any component of two or more modules is a circle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_command_line_is_imported_only_by_itself():
    importers = [m for m, names in GRAPH.items() if not m.startswith("histoseek_cli")
                 and any(n.startswith("histoseek_cli") for n in names)]
    assert not importers


def _reached(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(GRAPH[current])
    return seen


@pytest.mark.parametrize("package", TORCH_FREE)
def test_torch_free_rooms_never_import_torch_or_training(package):
    # Followed through every project module they reach, so a detour through another room counts too.
    offenders = sorted({f"{m} reaches {r}, which imports {name}" for m in MODULES if m.split(".")[0] == package
                        for r in _reached(m) for name in _imports(MODULES[r])
                        if name.split(".")[0] in TORCH | {"training"}})
    assert not offenders, "\n".join(offenders)


def test_a_fake_upward_import_is_caught(tmp_path):
    # The rule itself must be able to fail: the ground importing the API would be flagged.
    assert _rank("server.api.app") > _rank("histoseek.imaging")
    assert _rank("server.index.folder") < _rank("server.search") < _rank("server.slides.search")
    assert _rank("server.embedder") < _rank("server.index.build")
