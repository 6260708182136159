"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_every_module_is_an_attribute_of_its_package() -> None:
    """docs/api.md's claim: after `import drm` / `import cnn_equiv`, every module is reachable."""
    import importlib
    import pkgutil

    for package in ("drm", "cnn_equiv"):
        root = importlib.import_module(package)
        names = {m.name for m in pkgutil.iter_modules(root.__path__) if not m.name.startswith("_")}
        assert names == set(root.SUBMODULES), package
        for name in names:
            assert getattr(root, name) is importlib.import_module(f"{package}.{name}")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = importlib.import_module("drm").nope
