"""The package layout: no module of drm/ or cnn_equiv/ imports, directly or through others, a
module that imports it back (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, package_modules: set[str]) -> set[str]:
    """The library modules that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in package_modules}
    return found


def test_no_import_circle() -> None:
    modules = {
        f"{pkg}.{p.stem}": p
        for pkg in ("drm", "cnn_equiv")
        for p in (ROOT / pkg).glob("*.py")
        if p.stem != "__init__"
    }
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import circle: " + " -> ".join([*trail, name])
        state[name] = "open"
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
    assert graph["drm.sampling"] >= {"drm.model", "drm.reference"}  # the circle that was
