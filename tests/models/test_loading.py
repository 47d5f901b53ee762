"""models.loading: strict streaming of diffusers- and native-layout safetensors into a meta model."""

import json
import re

import pytest
import torch
from _tiny import TINY  # tests/models is on sys.path under pytest (no __init__.py)
from safetensors.torch import save_file
from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_
from tessera.models.wan.loading import load_wan_weights_, native_to_diffusers_name


def _source(gate_compress=False):
    model = materialize_random_(
        build_wan_on_meta(WanConfig(**TINY, gate_compress=gate_compress)), 5, "cpu", torch.float32
    )
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _meta(gate_compress=False):
    return build_wan_on_meta(WanConfig(**TINY, gate_compress=gate_compress))


def _assert_same_params(a, b):
    sb = b.state_dict()
    for name, p in a.state_dict().items():
        assert p.device.type == "cpu"
        assert torch.equal(p, sb[name]), name


_DIFFUSERS_TO_NATIVE = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.scale_shift_table$", ".modulation"),
)


def _to_native(name):
    for pattern, repl in _DIFFUSERS_TO_NATIVE:
        name = re.sub(pattern, repl, name)
    return name


def test_single_file_roundtrip_and_equal_outputs(tmp_path):
    src, state = _source()
    save_file(state, tmp_path / "model.safetensors")
    model = _meta()
    report = load_wan_weights_(model, tmp_path / "model.safetensors", "cpu", torch.float32)
    assert report.layout == "diffusers" and report.num_tensors == len(state) and not report.zero_initialised
    _assert_same_params(model, src)
    x, t, text = torch.randn(1, 4, 2, 4, 6), torch.tensor([500.0]), torch.randn(1, 5, 24)
    with torch.no_grad():
        assert torch.equal(model(x, t, text), src(x, t, text))


def test_sharded_with_index(tmp_path):
    src, state = _source()
    names = sorted(state)
    shards = {"m-00001-of-00002.safetensors": names[::2], "m-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    for target in (tmp_path / "m.safetensors.index.json", tmp_path):  # the index, or its directory
        model = _meta()
        report = load_wan_weights_(model, target, "cpu", torch.float32)
        assert len(report.files) == 2
        _assert_same_params(model, src)


def test_bf16_keeps_fp32_modules(tmp_path):
    _, state = _source()
    save_file(state, tmp_path / "model.safetensors")
    model = _meta()
    load_wan_weights_(model, tmp_path / "model.safetensors", "cpu", torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.blocks[1].norm2.bias.dtype == torch.float32


def test_native_layout_loads_identically(tmp_path):
    src, state = _source()
    native = {_to_native(k): v for k, v in state.items()}
    assert "blocks.0.norm3.weight" in native and "blocks.1.self_attn.o.bias" in native
    assert all(native_to_diffusers_name(_to_native(k)) == k for k in state)
    save_file({f"model.diffusion_model.{k}": v for k, v in native.items()}, tmp_path / "native.safetensors")
    model = _meta()
    report = load_wan_weights_(model, tmp_path / "native.safetensors", "cpu", torch.float32)
    assert report.layout == "native"
    _assert_same_params(model, src)


def test_missing_gate_is_zero_initialised(tmp_path):
    _, state = _source()
    save_file(state, tmp_path / "model.safetensors")
    model = _meta(gate_compress=True)
    report = load_wan_weights_(model, tmp_path / "model.safetensors", "cpu", torch.float32)
    assert set(report.zero_initialised) == {
        f"blocks.{i}.attn1.to_gate_compress.{p}" for i in range(2) for p in ("weight", "bias")
    }
    assert model.blocks[0].attn1.to_gate_compress.weight.abs().max() == 0
    with pytest.raises(ValueError, match=r"to_gate_compress"):
        load_wan_weights_(
            _meta(gate_compress=True),
            tmp_path / "model.safetensors",
            "cpu",
            torch.float32,
            allow_missing_gate=False,
        )


def test_gate_weights_without_gate_config_explain_fix(tmp_path):
    _, state = _source(gate_compress=True)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="gate_compress=True"):
        load_wan_weights_(_meta(), tmp_path / "model.safetensors", "cpu", torch.float32)


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda s: s.pop("blocks.1.attn2.norm_k.weight"), "blocks.1.attn2.norm_k.weight"),
        (lambda s: s.__setitem__("blocks.0.bogus.weight", torch.ones(3)), "blocks.0.bogus.weight"),
        (lambda s: s.__setitem__("proj_out.bias", torch.ones(5)), "proj_out.bias"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_mismatch_raises_one_error_naming_key(tmp_path, edit, key):
    _, state = _source()
    edit(state)
    save_file(state, tmp_path / "model.safetensors")
    model = _meta()
    with pytest.raises(ValueError, match=re.escape(key)) as info:
        load_wan_weights_(model, tmp_path / "model.safetensors", "cpu", torch.float32)
    assert "model.safetensors" in str(info.value) and "Fix" in str(info.value)
    # Nothing was loaded: the check runs on headers before any tensor is read.
    assert all(p.is_meta for p in model.parameters())


def test_many_missing_keys_are_abbreviated(tmp_path):
    _, state = _source()
    save_file({"patch_embedding.weight": state["patch_embedding.weight"]}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \(\d+\).*\.\.\. and \d+ more"):
        load_wan_weights_(_meta(), tmp_path / "model.safetensors", "cpu", torch.float32)


def test_corrupt_or_absent_file(tmp_path):
    _, state = _source()
    save_file(state, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_wan_weights_(_meta(), tmp_path / "cut.safetensors", "cpu", torch.float32)
    with pytest.raises(ValueError, match="nope.safetensors"):
        load_wan_weights_(_meta(), tmp_path / "nope.safetensors", "cpu", torch.float32)
