"""Config resolution and bad-input handling of the CLI: every error names the key and leaves no output."""

from __future__ import annotations

import pytest
from tessera.launch.config import all_keys, describe_keys, help_text, parse_overrides, resolve_config
from tessera.launch.generate import main
from tessera.runtime import GenerateConfig

EXACT_KEYS = {
    "prompt", "negative_prompt", "image", "seed", "num_frames", "height", "width", "num_steps", "guidance_scale",
    "flow_shift", "scheduler", "prompts_file", "model.preset", "model.path", "model.dtype", "model.cuda_graphs",
    "model.memory_check", "model.cache_dir", "model.offload_text_encoder", "model.vae_dtype", "model.quant",
    "model.compile", "guidance_scale_2", "model.boundary_ratio", "model.offload_experts",
    "parallel.sp", "parallel.cfg", "parallel.timeout_s",
    "attention.backend", "attention.sparsity", "attention.dense_blocks", "attention.dense_steps",
    "attention.sla_topk", "attention.sla_block_q", "attention.sla_block_k", "attention.sla_feature_map",
    "output.path", "output.overwrite", "output.save_latents", "output.encoder_preset", "output.fps", "dmd_timesteps",
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
    assert arch.num_attention_heads == 12 and arch.num_layers == 30 and arch.ffn_dim == 8960
    cfg, arch = resolve_config(["model.preset=wan2.1-t2v-14b", "height=720"])
    assert arch.num_attention_heads == 40 and arch.num_layers == 40 and cfg.flow_shift == 5.0


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


def test_parallel_sp_auto_is_world_size_over_cfg():
    assert GenerateConfig().parallel.sp == "auto"  # the schema default; resolved once in launch
    for argv, world, sp in [([], 1, 1), ([], 4, 4), (["parallel.cfg=2"], 4, 2), (["parallel.sp=auto"], 3, 3)]:
        cfg, _ = resolve_config(argv, world_size=world)
        assert cfg.parallel.sp == sp and isinstance(cfg.parallel.sp, int)
        cfg.validate(world_size=world)
    cfg, _ = resolve_config(["parallel.sp=2"], world_size=4)  # an explicit integer is still checked
    assert cfg.parallel.sp == 2
    with pytest.raises(ValueError, match=r"parallel\.sp \* parallel\.cfg = 2 \* 1 = 2 but the world size is 4"):
        cfg.validate(world_size=4)


def test_parallel_sp_auto_needs_world_size_multiple_of_cfg():
    cfg, _ = resolve_config(["parallel.cfg=2"], world_size=3)
    with pytest.raises(ValueError, match=r"parallel\.sp=auto: the world size 3 is not a multiple of parallel\.cfg=2"):
        cfg.validate(world_size=3)
    with pytest.raises(AssertionError, match="resolved"):  # a caller bug: validate before resolving
        GenerateConfig().validate(world_size=2)


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_parallel_sp_must_be_auto_or_positive(value):
    cfg, _ = resolve_config([f"parallel.sp={value}"])
    with pytest.raises(ValueError, match=rf"parallel\.sp={value} must be auto or an integer >= 1\. Fix: e\.g\."):
        cfg.validate(world_size=1)


@pytest.mark.parametrize(
    ("arg", "exc", "example"),
    [
        ("attention.dense_blocks=[0,1", ValueError, "attention.dense_blocks=[0,29]"),
        ("attention.dense_blocks=0,29", TypeError, "attention.dense_blocks=[0,29]"),
        ("attention.dense_blocks=[a,b]", TypeError, "attention.dense_blocks=[0,29]"),
        ("attention.sparsity=[0.9]*8", ValueError, "attention.sparsity=[0.5,0.9,0.9]"),
        ("attention.sparsity=abc", TypeError, "attention.sparsity=0.9"),
        ("num_steps=[3", ValueError, "num_steps=50"),
        ("num_steps=1.5", TypeError, "num_steps=50"),
        ("seed=abc", TypeError, "seed=42"),
        ("guidance_scale=high", TypeError, "guidance_scale=5.0"),
        ("output.overwrite=maybe", TypeError, "output.overwrite=true"),
        ("parallel.sp=2.5", TypeError, "parallel.sp=auto"),
        ("scheduler=a: b", TypeError, "scheduler=euler"),
    ],
)
def test_malformed_values_give_one_line_naming_key_and_example(arg, exc, example):
    key, _, value = arg.partition("=")
    with pytest.raises((ValueError, TypeError)) as info:
        cfg, _ = resolve_config([arg])
        cfg.validate(world_size=1)
    message = str(info.value)
    assert type(info.value) is exc
    assert message.startswith(f"{key}=") and value in message  # names the key and the value given
    assert "Fix: e.g. " in message and example in message.split("Fix: e.g. ")[1]
    assert "\n" not in message and "yaml" not in message.lower() and "full_key" not in message


def test_cli_malformed_value_prints_one_error_line(tmp_path, capsys):
    code = main(["attention.dense_blocks=[0,1", f"output.path={tmp_path / 'v.mp4'}"])
    assert code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: attention.dense_blocks=[0,1 ")
    assert "attention.dense_blocks=[0,29]" in error_lines[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_empty_and_free_text_prompts_are_verbatim():
    cfg, _ = resolve_config(["negative_prompt=", "prompt="])
    assert cfg.negative_prompt == "" and cfg.prompt == ""
    cfg.validate(world_size=1)
    cfg, _ = resolve_config(["prompt=a fox: running [draft] ${x}", "negative_prompt=no"])
    assert cfg.prompt == "a fox: running [draft] ${x}" and cfg.negative_prompt == "no"  # not YAML: no dict/bool


def test_every_key_has_a_one_line_description():
    docs = describe_keys()
    assert set(docs) == EXACT_KEYS
    for key, doc in docs.items():
        assert doc.strip() and "\n" not in doc, key


def test_help_groups_keys_and_shows_the_presets_defaults(capsys):
    assert main(["--help", "model.preset=wan2.1-t2v-14b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headings = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert headings == ["generation:", "model.*:", "parallel.*:", "attention.*:", "output.*:"]
    by_key = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert set(by_key) == EXACT_KEYS
    assert by_key["height"].endswith("(default: 720)") and by_key["width"].endswith("(default: 1280)")
    assert by_key["flow_shift"].endswith("(default: 5.0)") and by_key["parallel.sp"].endswith("(default: auto)")
    assert "sequence-parallel" in by_key["parallel.sp"]
    assert main(["--help"]) == 0  # no preset given: the default preset's (wan-tiny) defaults
    by_key = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert by_key["height"].endswith("(default: 128)") and by_key["model.preset"].endswith("(default: wan-tiny)")


def test_help_prints_once_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["--help"]) == 0
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    assert main(["--help"]) == 0
    assert "parallel.sp" in capsys.readouterr().out
