"""Config resolution and bad-input handling of the CLI: every error names the key and leaves no output."""

from __future__ import annotations

import pytest

from launch.config import all_keys, help_text, parse_overrides, resolve_config
from launch.generate import main

EXACT_KEYS = {
    "prompt", "negative_prompt", "seed", "num_frames", "height", "width", "num_steps", "guidance_scale",
    "flow_shift", "scheduler", "model.preset", "model.path", "model.dtype", "model.cuda_graphs", "parallel.sp",
    "parallel.cfg", "parallel.timeout_s",
    "attention.backend", "attention.sparsity", "attention.dense_blocks", "attention.dense_steps",
    "output.path", "output.overwrite", "output.save_latents",
}


def test_schema_has_exactly_the_documented_keys():
    assert set(all_keys()) == EXACT_KEYS


def test_help_lists_every_key_with_default(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in EXACT_KEYS:
        assert key in out
    assert "0.9" in help_text()  # the VSA sparsity default is visible


def test_overrides_and_preset_defaults_merge():
    cfg, arch = resolve_config(["model.preset=wan2.1-t2v-1.3b", "num_steps=3", "attention.sparsity=[0.5,0.8,0.9]"])
    assert (cfg.height, cfg.width, cfg.num_frames) == (480, 832, 81)  # preset defaults
    assert cfg.num_steps == 3 and list(cfg.attention.sparsity) == [0.5, 0.8, 0.9]
    assert arch["num_attention_heads"] == 12 and arch["num_layers"] == 30 and arch["ffn_dim"] == 8960
    cfg, arch = resolve_config(["model.preset=wan2.1-t2v-14b", "height=720"])
    assert arch["num_attention_heads"] == 40 and arch["num_layers"] == 40 and cfg.flow_shift == 5.0


def test_vsa_sparsity_alias_and_default():
    cfg, _ = resolve_config([])
    assert cfg.attention.sparsity == 0.9
    cfg, _ = resolve_config(["VSA_sparsity=0.75"])
    assert cfg.attention.sparsity == 0.75


@pytest.mark.parametrize(
    ("argv", "exc", "needle"),
    [
        (["num_step=3"], ValueError, "num_steps"),  # unknown key -> closest suggestion
        (["attention.sparsty=0.5"], ValueError, "attention.sparsity"),
        (["seed=abc"], TypeError, "seed"),
        (["num_frames=many"], TypeError, "num_frames"),
        (["model.preset=wan-huge"], ValueError, "model.preset"),
        (["justaword"], ValueError, "key=value"),
    ],
)
def test_resolve_errors_name_the_key(argv, exc, needle):
    with pytest.raises(exc, match=needle):
        resolve_config(argv)


@pytest.mark.parametrize(
    ("argv", "world", "needle"),
    [
        (["num_frames=16"], 1, "num_frames"),
        (["height=100"], 1, "height"),
        (["width=0"], 1, "width"),
        (["num_steps=0"], 1, "num_steps"),
        (["num_steps=-2"], 1, "num_steps"),
        (["attention.sparsity=1.0"], 1, "attention.sparsity"),
        (["attention.sparsity=-0.1"], 1, "attention.sparsity"),
        (["num_steps=2", "attention.sparsity=[0.5]"], 1, "attention.sparsity"),
        (["parallel.cfg=3"], 3, "parallel.cfg"),
        (["parallel.sp=2"], 4, "parallel.sp"),
        (["parallel.sp=2", "parallel.cfg=2"], 2, "world size"),
        (["parallel.timeout_s=0"], 1, "parallel.timeout_s"),
        (["model.preset=wan2.1-t2v-1.3b"], 1, "model.path"),
        (["scheduler=ddim"], 1, "scheduler"),
        (["model.dtype=float16"], 1, "model.dtype"),
        (["model.cuda_graphs=sometimes"], 1, "model.cuda_graphs"),
    ],
)
def test_validate_errors_name_the_key(argv, world, needle):
    cfg, _ = resolve_config(argv)
    with pytest.raises((ValueError, TypeError), match=needle):
        cfg.validate(world_size=world)


@pytest.mark.parametrize(("value", "expected"),
                         [("auto", "auto"), ("true", "True"), ("off", "False"), ("FALSE", "False")])
def test_cuda_graphs_accepts_auto_and_booleans(value, expected):
    cfg, _ = resolve_config([f"model.cuda_graphs={value}"])
    cfg.validate(world_size=1)
    assert cfg.model.cuda_graphs == expected  # OmegaConf spells booleans as "True" / "False"


def test_parse_overrides_keeps_values_verbatim():
    assert parse_overrides(["prompt=a=b", "VSA_sparsity=0.5"]) == ["prompt=a=b", "attention.sparsity=0.5"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["num_frames=16"], "num_frames"),
        (["attention.dense_blocks=[0,7]"], "attention.dense_blocks"),
        (["attention.backend=vsa", "num_frames=5"], "tile"),
        (["model.path=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ],
)
def test_cli_bad_input_exits_cleanly_without_output(tmp_path, capsys, argv, needle):
    out = tmp_path / "video.mp4"
    code = main([*argv, f"output.path={out}"])
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error:")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"precious")
    assert main([f"output.path={out}"]) == 2
    assert "output.overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]
