"""SLA through the product: the proj_l key spellings, checkpoint defaults, bad keys before any weight loads, SLA at
top-k 1 without proj_l equal to dense, and SLA on 2 and 3 ranks (and CFG-parallel) equal to one rank (torchrun/gloo).

The tiny runs use 17 frames at 64x80 (token grid 5x4x5 = 100 tokens) with 16-token query blocks and 8-token key
blocks: 7 query blocks and 13 key blocks, the last of each partial, so selection, partial blocks and the linear
branch all matter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _runs import latents_of, rel_err
from safetensors.torch import load_file, save_file
from tessera.launch.config import resolve_config
from tessera.launch.generate import main
from tessera.models.wan import WanConfig, build_wan_on_meta, load_wan_weights_

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red fox running through fresh snow"
RUN = dict(num_frames=17, height=64, width=80, seed=7, num_steps=2, guidance_scale=1.0)
SLA = ("attention.backend=sla", "attention.sla_block_q=16", "attention.sla_block_k=8", "attention.sla_topk=0.3")
SPELLINGS = {  # the checkpoint names of blocks.N's proj_l that SLA trainers used (native ones get a `net.` prefix)
    "attn_impl": "blocks.{n}.attn1.attn_impl.proj_l.{p}",
    "attn_op": "blocks.{n}.attn1.attn_op.local_attn.proj_l.{p}",
    "local_attn": "blocks.{n}.attn1.local_attn.proj_l.{p}",
    "native": "net.blocks.{n}.self_attn.attn_op.local_attn.proj_l.{p}",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from _wan_checkpoint import write_diffusers_checkpoint

    return write_diffusers_checkpoint(tmp_path_factory.mktemp("sla") / "Wan-tiny", seed=4)


def _proj_l(ckpt: Path) -> dict[str, torch.Tensor]:
    """Random proj_l per block, keyed `{n}.{weight|bias}` (same values for every spelling)."""
    state = load_file(str(ckpt / "transformer" / "diffusion_pytorch_model.safetensors"))
    head_dim = WanConfig.from_diffusers_config(json.loads((ckpt / "transformer" / "config.json").read_text()))
    d = head_dim.attention_head_dim
    gen = torch.Generator().manual_seed(11)
    blocks = sorted({int(key.split(".")[1]) for key in state if key.startswith("blocks.")})
    out = {}
    for n in blocks:
        out[f"{n}.weight"] = 0.3 * torch.randn(d, d, generator=gen)
        out[f"{n}.bias"] = 0.3 * torch.randn(d, generator=gen)
    return out


def _with_proj_l(ckpt: Path, dest: Path, spelling: str) -> Path:
    shutil.copytree(ckpt, dest)
    file = dest / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    if spelling == "native":  # the whole file under a `net.` prefix, as the SLA trainers save it
        state = {f"net.{key}": value for key, value in state.items()}
    for key, value in _proj_l(ckpt).items():
        n, p = key.split(".")
        state[SPELLINGS[spelling].format(n=n, p=p)] = value
    save_file(state, str(file))
    return dest


@pytest.fixture(scope="module")
def sla_ckpts(ckpt, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sla_spellings")
    return {name: _with_proj_l(ckpt, root / name, name) for name in SPELLINGS}


def run_args(path: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={path}", f"prompt={PROMPT}", f"output.path={out}", "output.save_latents=true",
            *(f"{k}={v}" for k, v in RUN.items()), *extra]


def report_of(out: Path) -> dict:
    return json.loads(out.with_suffix(".json").read_text())


def run_torchrun(tmp_path: Path, nproc: int, argv: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "launch" / "generate.py"), *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# --- loading ---------------------------------------------------------------------------------------------------


def test_every_proj_l_spelling_loads_the_same_weights(ckpt, sla_ckpts):
    expected = _proj_l(ckpt)
    config = WanConfig.from_diffusers_config(json.loads((ckpt / "transformer" / "config.json").read_text()),
                                             sla_proj_l=True)
    for name, path in sla_ckpts.items():
        model = build_wan_on_meta(config)
        load_wan_weights_(model, path / "transformer", device="cpu", dtype=torch.float32)
        for key, value in expected.items():
            n, p = key.split(".")
            assert torch.equal(getattr(model.blocks[int(n)].attn1.proj_l, p), value), (name, key)


def test_proj_l_in_a_checkpoint_defaults_to_sla(sla_ckpts, ckpt):
    for name, path in sla_ckpts.items():
        cfg, arch = resolve_config([f"model.path={path}"])
        assert cfg.attention.backend == "sla" and arch.sla_proj_l, name
    cfg, arch = resolve_config([f"model.path={ckpt}"])
    assert cfg.attention.backend != "sla" and not arch.sla_proj_l
    cfg, _ = resolve_config([f"model.path={sla_ckpts['attn_op']}", "attention.backend=dense"])
    assert cfg.attention.backend == "dense"  # an explicit choice wins


def test_two_spellings_give_bit_identical_latents(sla_ckpts, tmp_path):
    outs = []
    for name in ("attn_impl", "native"):
        out = tmp_path / f"{name}.mp4"
        assert main(run_args(sla_ckpts[name], out, *SLA)) == 0
        outs.append(out)
    assert torch.equal(latents_of(outs[0]), latents_of(outs[1]))
    report = report_of(outs[0])
    assert report["attention"]["backend"] == "sla"
    assert report["attention"]["options"] == {"sla_topk": 0.3, "sla_block_q": 16, "sla_block_k": 8,
                                              "sla_feature_map": "softmax"}
    assert report["attention"]["sparsity_per_step"] == [None, None]  # SLA's level is its top-k, not a sparsity


# --- semantics end to end --------------------------------------------------------------------------------------


def test_sla_topk_one_without_proj_l_equals_dense(ckpt, tmp_path):
    dense, sla = tmp_path / "dense.mp4", tmp_path / "sla.mp4"
    assert main(run_args(ckpt, dense, "attention.backend=dense")) == 0
    with pytest.warns(UserWarning, match=r"no blocks\.\*\.attn1\.proj_l weights"):
        assert main(run_args(ckpt, sla, "attention.backend=sla", "attention.sla_block_q=16",
                             "attention.sla_block_k=8", "sla_topk=1")) == 0
    assert rel_err(latents_of(sla), latents_of(dense)) < 1e-5
    assert "blocks.*.attn1.proj_l" in report_of(sla)["weights"]["zero_initialised"]


def test_sla_differs_from_dense_and_from_its_own_sparse_part(sla_ckpts, ckpt, tmp_path):
    """SLA really ran: its latents differ from dense and from SLA without proj_l (the linear branch counts)."""
    with_l, without_l, dense = tmp_path / "l.mp4", tmp_path / "nol.mp4", tmp_path / "d.mp4"
    assert main(run_args(sla_ckpts["attn_op"], with_l, *SLA)) == 0
    with pytest.warns(UserWarning, match="proj_l"):
        assert main(run_args(ckpt, without_l, *SLA)) == 0
    assert main(run_args(ckpt, dense, "attention.backend=dense")) == 0
    assert rel_err(latents_of(with_l), latents_of(without_l)) > 1e-3
    assert rel_err(latents_of(without_l), latents_of(dense)) > 1e-4


@pytest.fixture(scope="module")
def one_rank_sla(sla_ckpts, tmp_path_factory) -> torch.Tensor:
    out = tmp_path_factory.mktemp("sla_one") / "one.mp4"
    assert main(run_args(sla_ckpts["local_attn"], out, *SLA)) == 0
    return latents_of(out)


@pytest.mark.multirank
@pytest.mark.parametrize("ranks", [2, 3])
def test_sla_on_several_ranks_equals_one_rank(sla_ckpts, one_rank_sla, tmp_path, ranks):
    many = tmp_path / "many.mp4"
    run_torchrun(tmp_path, ranks, run_args(sla_ckpts["local_attn"], many, *SLA))
    assert rel_err(latents_of(many), one_rank_sla) < 1e-5
    assert report_of(many)["attention"]["backend"] == "sla"


@pytest.mark.multirank
def test_sla_cfg_parallel_equals_one_rank(sla_ckpts, tmp_path):
    one, cfg2 = tmp_path / "one.mp4", tmp_path / "cfg2.mp4"
    guided = ("guidance_scale=4.0", "negative_prompt=blurry low quality")
    assert main(run_args(sla_ckpts["attn_impl"], one, *SLA, *guided)) == 0
    run_torchrun(tmp_path, 2, run_args(sla_ckpts["attn_impl"], cfg2, *SLA, *guided, "parallel.cfg=2"))
    assert rel_err(latents_of(cfg2), latents_of(one)) < 1e-5


# --- bad input, before any weight loads ------------------------------------------------------------------------


@pytest.mark.parametrize(("arg", "needle"), [
    ("attention.sla_topk=0", r"attention.sla_topk=0(\.0)? must lie in \(0, 1\]"),
    ("sla_topk=1.5", r"attention.sla_topk=1.5 must lie in \(0, 1\]"),
    ("attention.sla_block_q=48", "attention.sla_block_q=48 must be a power of two"),
    ("attention.sla_block_k=0", "attention.sla_block_k=0 must be a power of two"),
    ("attention.sla_feature_map=tanh", "attention.sla_feature_map"),
])
def test_bad_sla_keys_fail_before_weights_load(arg, needle, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("loaded weights before the config error")

    monkeypatch.setattr("tessera.models.wan.family.build_wan_on_meta", fail)
    out = tmp_path / "v.mp4"
    assert main(["attention.backend=sla", arg, f"output.path={out}"]) == 2
    assert __import__("re").search(needle, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
