"""runtime/ and launch/ are model-agnostic: they ask the model family (`models/family.py`) for everything
model-specific. No import of a family's package (`tessera.models.wan...`) and no identifier of one (`WanConfig`,
`build_wan_on_meta`, ...) in their code; comments and docstrings may cite diffusers' pipelines. Plus the registry's
own contract."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from tessera.models import family_for, family_names, get_family, preset_names, register_family, unregister_family
from tessera.models.family import DEFAULT_LATENTS
from tessera.models.wan.family import WanFamily

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


class _ToyCheckpoint:
    """A checkpoint format no other family claims: a directory with toy_model.json (an arch and a weight seed)."""

    def __init__(self, path: Path) -> None:
        data = json.loads((path / "toy_model.json").read_text())
        self.path, self.arch, self.seed = path, {**data["arch"], "patch_size": tuple(data["arch"]["patch_size"])}, \
            data["seed"]
        self.text_encoder = self.weights_2 = self.boundary_ratio = None


class _ToyFamily(WanFamily):
    """A second family, registered by this test alone (no edit anywhere else): its own checkpoint detection and
    resolution, seeded random weights; Wan's DiT and tiny conditioning underneath, so its video is checkable."""

    name = "toy"
    presets = random_weight_presets = ()

    def claims(self, path: Path) -> bool:
        return (path / "toy_model.json").is_file()

    def resolve(self, path):
        return _ToyCheckpoint(Path(path))

    def checkpoint_at(self, path, resolved=None):
        return None if path is None else resolved if resolved is not None else self.resolve(path)

    def resolve_model(self, preset, preset_arch, explicit, path, *, preset_boundary_ratio=None, checkpoint=None):
        return self.checkpoint_at(path, checkpoint).arch, {}

    def check_expert_config(self, boundary_ratio, ckpt) -> None:
        pass

    def check_checkpoint_request(self, ckpt, *, height, width, preset, image) -> None:
        pass

    def latents(self, ckpt):
        return DEFAULT_LATENTS

    def image_optional(self, ckpt, preset) -> bool:
        return False

    def build_dit(self, config, device, dtype, ckpt, *, expert, seed):
        return super().build_dit(config, device, dtype, None, expert=expert, seed=ckpt.seed)

    def plan_conditioning(self, ckpt, preset):
        return super().plan_conditioning(None, preset)

    def plan_image(self, config, ckpt, preset):
        return None


def test_a_family_registered_elsewhere_runs_through_the_runtime(tmp_path: Path) -> None:
    """The runtime reaches a model only through the registry: a family added by one `register_family` line (here, in
    a test) runs end to end, and on the same weights (wan-tiny's arch, seed 0) gives wan-tiny's latents bit for bit."""
    import tessera
    from tessera.launch.config import load_preset

    arch, _ = load_preset("wan-tiny")
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy_model.json").write_text(json.dumps({"arch": {**arch, "patch_size": list(arch[
        "patch_size"])}, "seed": 0}))
    request = dict(prompt="a red fox", seed=2, num_frames=9, height=32, width=48, num_steps=2)
    register_family(_ToyFamily())
    try:
        with tessera.load(model={"path": str(tmp_path / "toy")}, attention={"backend": "dense"}) as pipe:
            toy = pipe.generate(**request)
    finally:
        unregister_family("toy")
    with tessera.load(model={"preset": "wan-tiny"}, attention={"backend": "dense"}) as pipe:
        wan = pipe.generate(**request)
    assert (toy.report["family"], wan.report["family"]) == ("toy", "wan")
    assert toy.report["weights"]["seed"] == 0
    assert torch.equal(toy.latents, wan.latents)
