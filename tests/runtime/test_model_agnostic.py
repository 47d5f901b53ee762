"""runtime/ and launch/ are model-agnostic: they ask the model family (`models/family.py`) for everything
model-specific. No import of a family's package (`tessera.models.wan...`) and no identifier of one (`WanConfig`,
`build_wan_on_meta`, ...) in their code; comments and docstrings may cite diffusers' pipelines. Plus the registry's
own contract."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from tessera.models import family_for, family_names, get_family, preset_names

REPO = Path(__file__).resolve().parents[2]
FAMILY_PACKAGES = sorted(p.name for p in (REPO / "models").iterdir() if (p / "__init__.py").is_file())
_FAMILY_WORD = re.compile(r"wan", re.IGNORECASE)


def _family_uses(source: str) -> list[str]:
    """'line: what' for each import of a family package and each identifier naming a family (Wan*, *_wan_*)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names = [a.asname or a.name for a in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[:2] == ["tessera", "models"] and len(parts) > 2 and parts[2] in FAMILY_PACKAGES:
                    found.append(f"{node.lineno}: import {module}")
            found += [f"{node.lineno}: {name}" for name in names if _FAMILY_WORD.search(name) and "." not in name]
        elif isinstance(node, ast.Name) and _FAMILY_WORD.search(node.id):
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and _FAMILY_WORD.search(node.attr):
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and _FAMILY_WORD.search(node.name):
            found.append(f"{node.lineno}: def {node.name}")
    return sorted(found, key=lambda use: int(use.split(":")[0]))


def test_the_check_catches_family_names() -> None:
    source = ("from tessera.models.wan.config import WanConfig\nimport tessera.models.wan\nx = build_wan_on_meta(c)\n"
              "y = cfg.wan_thing\nclass _WanNoise: pass\n# WanPipeline in a comment\ns = 'WanPipeline'\n")
    assert _family_uses(source) == ["1: import tessera.models.wan.config", "1: WanConfig",
                                    "2: import tessera.models.wan", "3: build_wan_on_meta", "4: .wan_thing",
                                    "5: def _WanNoise"]


@pytest.mark.parametrize("package", ["runtime", "launch"])
def test_package_names_no_model_family(package: str) -> None:
    found = [f"{path.relative_to(REPO)}:{use}" for path in sorted((REPO / package).glob("*.py"))
             for use in _family_uses(path.read_text())]
    assert found == [], f"{package}/ must ask the model family (tessera.models.family_for), not name one: {found}"


def test_registry_finds_families_by_checkpoint_and_by_preset(tmp_path: Path) -> None:
    assert "wan" in family_names() and "wan-tiny" in preset_names()
    assert family_for(None, "wan-tiny") is get_family("wan")
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanDMDPipeline"}')
    assert family_for(tmp_path, "no-such-preset") is get_family("wan")  # the checkpoint decides first
    with pytest.raises(ValueError, match="model.preset='no-such-preset' is unknown"):
        family_for(tmp_path / "missing", "no-such-preset")
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("no-such-family")
