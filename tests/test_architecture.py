"""The package layout is the architecture (docs/architecture.md): imports only point down.

diffusion <- conditioning <- sampling <- evaluation, with models and data beside them and
training on top. A module-level or function-level import that points the other way fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ilvr_toolkit"
HELPERS = {
    "cli",
    "fileio",
    "images",
    "runtime",
    "batchjob",
    "flags",
}  # top-level modules every package may use

# package -> the ilvr_toolkit packages it may import (besides HELPERS and itself)
ALLOWED = {
    "diffusion": set(),
    "conditioning": {"diffusion"},
    "models": set(),
    "data": set(),
    "sampling": {"diffusion", "conditioning", "models", "data"},
    "evaluation": {"diffusion", "conditioning", "models", "data", "sampling"},
    "training": {"diffusion", "conditioning", "models", "data", "sampling", "evaluation"},
}


def _imported_packages(path: Path) -> set[str]:
    """First component under ilvr_toolkit of every import in ``path`` (absolute or relative)."""
    package = path.relative_to(PACKAGE).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(package[:-1])[: len(package) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if parts else [[alias.name] for alias in node.names]
            elif node.module and node.module.startswith("ilvr_toolkit"):
                parts = node.module.split(".")[1:]
                names = [parts] if parts else [[alias.name] for alias in node.names]
            else:
                continue
            found.update(name[0] for name in names if name and _is_part(name[0]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ilvr_toolkit" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _is_part(name: str) -> bool:
    """A subpackage or top-level module of ilvr_toolkit (not a name such as ``__version__``)."""
    return (PACKAGE / name / "__init__.py").exists() or (PACKAGE / f"{name}.py").exists()


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package: str) -> None:
    bad = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        wrong = _imported_packages(path) - ALLOWED[package] - HELPERS - {package}
        if wrong:
            bad[str(path.relative_to(PACKAGE))] = sorted(wrong)
    assert not bad, f"imports against the layering of docs/architecture.md: {bad}"


def test_helpers_import_no_package() -> None:
    for name in sorted(HELPERS):
        path = PACKAGE / f"{name}.py"
        assert not (_imported_packages(path) & set(ALLOWED)), f"{name}.py imports a package"


def test_every_package_is_placed() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED), f"packages missing from the layering: {packages - set(ALLOWED)}"


def test_diffusion_imports_torch_only() -> None:
    for path in (PACKAGE / "diffusion").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            for module in modules:
                root = module.split(".")[0]
                assert root in {
                    "torch",
                    "numpy",
                    "math",
                    "dataclasses",
                    "typing",
                    "collections",
                    "__future__",
                    "abc",
                    "enum",
                    "functools",
                    "inspect",
                    "operator",
                    "re",
                    "warnings",
                }, f"{path.name} imports {module}"


def test_no_module_uses_another_modules_private_names() -> None:
    """A leading underscore means "this module's (class's) own": another module importing such a
    name (``from .runner import _load``) or reading it off an object (``diffusion._coef``) uses a
    public name in all but name; make it public instead."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Attribute):  # self._x, cls._x: the class's own; os._exit: the API
                own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "os")
                names = [] if own else [node.attr]
            private = [name for name in names if name[:1] == "_" and name[:2] != "__"]
            bad += [f"{path.relative_to(PACKAGE)}:{node.lineno} {name}" for name in private]
    assert not bad, f"private names used outside their module or class: {bad}"
