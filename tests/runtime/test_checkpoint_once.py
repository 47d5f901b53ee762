"""The checkpoint is resolved once (its JSON files and safetensors headers read once) per launch and per loaded
pipeline, and that one `Checkpoint` is passed down: to the config of every request, the pre-flight checks and the
pipeline (CPU, a tiny diffusers checkpoint, real files)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from _wan_checkpoint import write_diffusers_checkpoint  # noqa: E402

SMALL = ["num_frames=5", "height=32", "width=48", "num_steps=1", "attention.backend=dense"]


@pytest.fixture
def resolutions(monkeypatch):
    """The checkpoints resolved from now on: every `resolve_checkpoint` of a diffusers directory lands here."""
    import tessera.models.wan.checkpoint as checkpoint_module

    calls: list[Path] = []
    real = checkpoint_module._resolve_diffusers

    def counted(path: Path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(checkpoint_module, "_resolve_diffusers", counted)
    return calls


def test_a_launch_with_several_requests_resolves_the_checkpoint_once(tmp_path, resolutions):
    from tessera.launch.generate import main

    ckpt = write_diffusers_checkpoint(tmp_path / "ckpt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red fox\n{"prompt": "a grey wolf", "seed": 4}\n')
    out = tmp_path / "out" / "v.mp4"
    assert main([f"model.path={ckpt}", f"prompts_file={prompts}", f"output.path={out}", *SMALL]) == 0
    assert sorted(p.name for p in out.parent.glob("*.mp4")) == ["v-001.mp4", "v-002.mp4"]
    assert resolutions == [ckpt]


def test_a_loaded_pipeline_resolves_the_checkpoint_once(tmp_path, resolutions):
    import tessera

    ckpt = write_diffusers_checkpoint(tmp_path / "ckpt")
    keys = dict(item.split("=", 1) for item in SMALL if not item.startswith("attention"))
    request = {k: int(v) for k, v in keys.items()}
    with tessera.load(model={"path": str(ckpt)}, attention={"backend": "dense"}) as pipe:
        pipe.generate(prompt="a red fox", seed=1, **request)
        pipe.generate(prompt="a grey wolf", seed=2, **request)
        pipe.check(prompt="a third", seed=3, **request)
    assert resolutions == [ckpt]
