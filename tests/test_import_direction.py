"""Imports flow one way: launch -> runtime -> {models, parallel, attention}; models, parallel -> attention.

Everything is installed under one import name, `tessera` (the repository root is the package, its folders the
subpackages): `tessera.runtime`, `tessera.launch`, ... Walks every .py file of the five packages and the root
`__init__.py` (absolute and relative imports, including ones inside functions or ``TYPE_CHECKING`` blocks) and fails
listing each forbidden edge as ``file:line``, and each import of a bare generic name (`runtime`, `models`, ...),
which would not resolve once installed (or would pick up a user's own `models/` folder).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, set[str]] = {
    "launch": {"runtime"},
    "runtime": {"models", "parallel", "attention"},
    "models": {"attention"},
    "parallel": {"attention"},
    "attention": set(),
    "": {"launch", "runtime"},  # the root __init__.py: the public API
}
PACKAGES = set(ALLOWED) - {""}
TOP = "tessera"


def _imported_modules(source: str, rel_path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in ``source`` (the file at ``rel_path`` from the repo root).

    Relative imports are resolved to absolute names; one that climbs above the top-level package is
    reported as such (Python would fail to import it anyway).
    """
    parts = [TOP, *rel_path.with_suffix("").parts]
    package_parts = parts[:-1]  # a module's package; for __init__.py the package itself
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=str(rel_path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module or ""))
            elif node.level > len(package_parts):
                found.append((node.lineno, "<relative import above the top-level package>"))
            else:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
    return found


def _violations() -> list[str]:
    violations = []
    files = [(package, path) for package in sorted(PACKAGES) for path in sorted((REPO_ROOT / package).rglob("*.py"))]
    for package, path in [*files, ("", REPO_ROOT / "__init__.py")]:
        rel_path = path.relative_to(REPO_ROOT)
        for line, module in _imported_modules(path.read_text(), rel_path):
            parts = module.split(".")
            if module.startswith("<"):
                violations.append(f"{rel_path}:{line}: {module}")
            elif parts[0] in PACKAGES:
                violations.append(f"{rel_path}:{line}: bare import of {module}: write tessera.{module}")
            elif parts[0] == TOP and len(parts) > 1 and parts[1] in PACKAGES:
                target = parts[1]
                if target != package and target not in ALLOWED[package]:
                    violations.append(f"{rel_path}:{line}: {package or TOP} -> {target} ({module})")
    return violations


def test_imports_flow_one_way() -> None:
    violations = _violations()
    if violations:
        print("\n".join(violations))
    assert not violations, "forbidden import edges (see DESIGN.md section 2):\n" + "\n".join(violations)


def test_checker_resolves_absolute_and_relative_imports() -> None:
    """The walker must see every import style, or the real test could never fail."""
    source = (
        "import tessera.launch.generate\nfrom tessera.runtime import plan\nfrom . import dense\n"
        "from ..mesh import build_mesh\nfrom .... import x\n"
        "def f():\n    import models.wan\n"
    )
    found = dict(_imported_modules(source, Path("parallel/sub/probe.py")))
    assert found == {
        1: "tessera.launch.generate",
        2: "tessera.runtime",
        3: "tessera.parallel.sub",
        4: "tessera.parallel.mesh",
        5: "<relative import above the top-level package>",
        7: "models.wan",
    }
    assert dict(_imported_modules("from . import dense\n", Path("attention/__init__.py"))) == {1: "tessera.attention"}
    assert dict(_imported_modules("from .launch import load\n", Path("__init__.py"))) == {1: "tessera.launch"}
