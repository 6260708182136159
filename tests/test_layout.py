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


MAX_CNN_EQUIV_LINES = 400  # one tool per module: a module past this holds two


def test_no_cnn_equiv_module_is_over_the_line_limit() -> None:
    lengths = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "cnn_equiv").glob("*.py")}
    assert {n: k for n, k in lengths.items() if k > MAX_CNN_EQUIV_LINES} == {}


def test_visualize_only_re_exports_the_tool_modules() -> None:
    """cnn_equiv/visualize.py holds a docstring, imports and `__all__`: no logic of its own."""
    import importlib

    from cnn_equiv import visualize

    tree = ast.parse((ROOT / "cnn_equiv" / "visualize.py").read_text())
    imported: dict[str, tuple[str, str]] = {}  # name -> (module, name there)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert node.module and node.module.startswith("cnn_equiv.") and node.level == 0
            imported |= {a.asname or a.name: (node.module, a.name) for a in node.names}
        elif isinstance(node, ast.Assign):
            assert [ast.unparse(t) for t in node.targets] == ["__all__"]
        else:  # only the docstring
            assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), node.lineno
    assert set(visualize.__all__) == set(imported)
    for name, (module, original) in imported.items():
        assert getattr(visualize, name) is getattr(importlib.import_module(module), original)


def _imported_scripts(source: str, scripts: set[str]) -> set[str]:
    """The scripts of experiments/ that `source` (a module of experiments/) imports anywhere in
    its body: `import experiments.X`, `from experiments.X import ...`, `from experiments import
    X`, and the relative forms `from .X import ...`, `from . import X`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level <= 1:
            base = ".".join(["experiments"] * node.level + [node.module or ""]).rstrip(".")
            modules = [base] + [f"{base}.{a.name}" for a in node.names]
        found |= {m.split(".")[1] for m in modules if m.startswith("experiments.")}
    return found & scripts


def test_no_script_imports_another_script() -> None:
    """A script (a module of experiments/ run with `python -m`) shares code through the helper
    modules (experiments/_*.py, the experiments/training/ package), never by importing another
    script (imports inside functions included)."""
    scripts = {p.stem for p in (ROOT / "experiments").glob("*.py") if not p.stem.startswith("_")}
    assert {"train", "demo", "compare_views", "em_vs_sgd", "bench_all"} <= scripts
    imports = {name: _imported_scripts((ROOT / "experiments" / f"{name}.py").read_text(),
                                       scripts) - {name} for name in sorted(scripts)}  # fmt: skip
    assert {name: found for name, found in imports.items() if found} == {}
    # oracle for the parser: every spelling of an import of a script is seen
    probe = (
        "from experiments import train, _cli\nimport experiments.demo as d\n"
        "from experiments.training import loop\n"
        "def f():\n    from .em_vs_sgd import run\n    from . import bench_all\n"
    )
    assert _imported_scripts(probe, scripts) == {"train", "demo", "em_vs_sgd", "bench_all"}


MAX_MODULE_LINES = 500  # issue 12: past this a module holds two concepts, or should say why not
# the modules that may be longer, each with its reason (CONTRIBUTING.md says why)
LONG_MODULES = {
    "drm/levels.py",  # the level protocol and every kind side by side
}


def test_no_module_is_over_the_line_limit() -> None:
    """No module of drm/, cnn_equiv/ or experiments/ (subpackages included) is over
    MAX_MODULE_LINES lines, except those of LONG_MODULES; an entry there that is gone or now
    under the limit is taken off the list."""
    lengths = {
        p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
        for pkg in ("drm", "cnn_equiv", "experiments")
        for p in sorted((ROOT / pkg).rglob("*.py"))
    }
    over = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert {name: n for name, n in over.items() if name not in LONG_MODULES} == {}
    stale = LONG_MODULES - set(over)
    assert not stale, f"gone or under the limit now, take off LONG_MODULES: {sorted(stale)}"
    assert len(lengths) > 40  # oracle for the walk: the subpackages are read too
    assert "experiments/training/loop.py" in lengths
