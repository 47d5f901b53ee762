"""runtime/ asks the attention registry for behaviour: no comparison against a backend name ("vsa", "dense")."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
BACKEND_NAMES = {"vsa", "dense"}


def _name_tests(source: str) -> list[int]:
    """Lines comparing against a backend name: ``x == "vsa"``, ``"vsa" in blocks``, ``x in ("dense", ...)``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            consts = [c for o in operands for c in ([o] if isinstance(o, ast.Constant) else getattr(o, "elts", []))]
            if any(isinstance(c, ast.Constant) and c.value in BACKEND_NAMES for c in consts):
                lines.append(node.lineno)
    return lines


def test_the_check_catches_a_name_test() -> None:
    assert _name_tests('if backend == "vsa":\n    pass\nok = "dense" in blocks or b in ("x", "dense")') == [1, 3, 3]
    assert _name_tests('reason = "attention.backend=dense"') == []


def test_runtime_has_no_backend_name_tests() -> None:
    found = [f"{path.name}:{line}" for path in sorted(RUNTIME.glob("*.py")) for line in _name_tests(path.read_text())]
    assert found == [], f"backend names tested in runtime/ (ask tessera.attention.get_backend instead): {found}"
