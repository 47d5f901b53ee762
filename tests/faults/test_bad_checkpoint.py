"""Bad checkpoint input through the CLI (`launch.generate.main`, one rank, in process): a missing path, a
truncated safetensors file, the wrong architecture for the preset and a NaN weight each fail with a clear
error naming the problem, exit code 2 and no output file.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tessera.launch.config import load_preset
from tessera.launch.generate import main
from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_

SMALL = ["model.preset=wan-tiny", "num_frames=5", "height=32", "width=32", "num_steps=2"]


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    arch, _ = load_preset("wan-tiny")
    model = materialize_random_(build_wan_on_meta(WanConfig(**arch)), seed=0, device="cpu", dtype=torch.float32)
    return {name: p.detach().contiguous() for name, p in model.state_dict().items()}


def _run(tmp_path, capsys, checkpoint) -> tuple[int, str]:
    out = tmp_path / "out" / "video.mp4"
    code = main([*SMALL, f"model.path={checkpoint}", f"output.path={out}"])
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    return code, capsys.readouterr().err


def test_good_checkpoint_runs(tmp_path, capsys, tiny_state_dict):
    save_file(tiny_state_dict, tmp_path / "tiny.safetensors")
    assert main([*SMALL, f"model.path={tmp_path / 'tiny.safetensors'}", f"output.path={tmp_path / 'v.mp4'}"]) == 0
    assert (tmp_path / "v.mp4").stat().st_size > 0  # the control: the failures below are the checkpoints'


def test_missing_checkpoint_directory(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, tmp_path / "no-such-dir")
    assert code == 2 and err.startswith("error: model.path=") and "does not exist" in err


def test_truncated_safetensors(tmp_path, capsys, tiny_state_dict):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state_dict, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, err = _run(tmp_path, capsys, path)
    # The header is read while the config resolves (which extra weights, e.g. SLA's proj_l, the file carries), so the
    # broken file is named before any process group or weight load.
    assert code == 2 and err.startswith("error: cannot read safetensors file") and "truncated" in err, err
    assert str(path) in err, err


def test_wrong_architecture_for_the_preset(tmp_path, capsys, tiny_state_dict):
    path = tmp_path / "three_layers.safetensors"
    save_file({k: v for k, v in tiny_state_dict.items() if not k.startswith("blocks.3.")}, path)
    code, err = _run(tmp_path, capsys, path)
    assert code == 2 and err.startswith("error:") and "blocks.3." in err, err


def test_nan_weight_is_named(tmp_path, capsys, tiny_state_dict):
    poisoned = dict(tiny_state_dict)
    poisoned["blocks.1.attn1.to_q.weight"] = tiny_state_dict["blocks.1.attn1.to_q.weight"].clone()
    poisoned["blocks.1.attn1.to_q.weight"][3, 5] = float("nan")
    poisoned["proj_out.bias"] = torch.full_like(tiny_state_dict["proj_out.bias"], float("inf"))
    path = tmp_path / "nan.safetensors"
    save_file(poisoned, path)
    code, err = _run(tmp_path, capsys, path)
    assert code == 2 and "failed during load" in err and "NaN/Inf" in err, err
    assert "blocks.1.attn1.to_q.weight" in err and "proj_out.bias" in err and "tensors (2)" in err
