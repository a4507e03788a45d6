"""Repository-wide contracts: namespace layout and declared sibling dependencies.

A package may import another ``altgrad.*`` package only if its ``pyproject.toml`` declares that
distribution. The per-package nox sessions would catch a violation at run time only on code paths
the tests happen to exercise; this static check sees every import in ``src/`` and ``tests/``.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml"))
EXPECTED = {"discounted-cumsum", "sign-optim", "es-layers", "zero-order", "dni"}


def _declared_siblings(pkg_dir: Path) -> set[str]:
    """altgrad import names (``es_layers``) that ``pkg_dir`` declares as runtime dependencies."""
    project = tomllib.loads((pkg_dir / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower() for r in project.get("dependencies", [])}
    return {n.removeprefix("altgrad-").replace("-", "_") for n in names if n.startswith("altgrad-")}


def altgrad_imports(source: str) -> set[str]:
    """The ``altgrad.<name>`` packages that a module's source imports (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == "altgrad":
                modules = [f"altgrad.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "altgrad" and len(parts) > 1:
                found.add(parts[1])
    return found


def undeclared_imports(pkg_dir: Path, root: Path = ROOT) -> dict[str, set[str]]:
    """Map each file under ``src/`` and ``tests/`` to the sibling packages it imports without declaring them."""
    own = pkg_dir.name.replace("-", "_")
    allowed = _declared_siblings(pkg_dir) | {own}
    bad = {}
    for sub in ("src", "tests"):
        for path in sorted((pkg_dir / sub).rglob("*.py")):
            extra = altgrad_imports(path.read_text()) - allowed
            if extra:
                bad[str(path.relative_to(root))] = extra
    return bad


def test_all_five_packages_exist():
    assert {p.name for p in PACKAGE_DIRS} == EXPECTED


@pytest.mark.parametrize("pkg_dir", PACKAGE_DIRS, ids=lambda p: p.name)
def test_no_undeclared_sibling_imports(pkg_dir):
    assert undeclared_imports(pkg_dir) == {}


@pytest.mark.parametrize("pkg_dir", PACKAGE_DIRS, ids=lambda p: p.name)
def test_pep420_namespace_and_naming(pkg_dir):
    mod = pkg_dir.name.replace("-", "_")
    project = tomllib.loads((pkg_dir / "pyproject.toml").read_text())["project"]
    assert project["name"] == f"altgrad-{pkg_dir.name}"
    assert not (pkg_dir / "src" / "altgrad" / "__init__.py").exists()
    assert (pkg_dir / "src" / "altgrad" / mod / "__init__.py").exists()
    for sub in ("tests", "benchmarks"):
        assert (pkg_dir / sub).is_dir()
    assert (pkg_dir / "README.md").is_file()


def test_only_zero_order_depends_on_a_sibling():
    deps = {p.name: _declared_siblings(p) for p in PACKAGE_DIRS}
    assert deps == {name: ({"es_layers"} if name == "zero-order" else set()) for name in EXPECTED}


def test_checker_flags_an_undeclared_import(tmp_path):
    pkg = tmp_path / "dni"
    (pkg / "src" / "altgrad" / "dni").mkdir(parents=True)
    (pkg / "tests").mkdir()
    (pkg / "pyproject.toml").write_text('[project]\nname = "altgrad-dni"\ndependencies = ["torch>=2.5"]\n')
    (pkg / "src" / "altgrad" / "dni" / "ok.py").write_text("import torch\nfrom altgrad.dni import x\n")
    (pkg / "tests" / "test_bad.py").write_text(
        "from altgrad import es_layers\nimport altgrad.sign_optim.foo\n"
    )
    assert undeclared_imports(pkg, root=tmp_path) == {"dni/tests/test_bad.py": {"es_layers", "sign_optim"}}
