"""Wan2.2 A14B two-expert models on a tiny random two-expert diffusers checkpoint (CPU, fp32).

The final latents equal diffusers' WanPipeline (transformer_2 + boundary_ratio) at 1 and 2 ranks, with a
guidance_scale_2 of its own; a wrong switch (experts swapped, `>` for `>=`, one guidance scale) is shown to miss
that reference by far more than the tolerance. Offloaded experts (`model.offload_experts=true`) give bit-identical
latents: on a CPU device the "device copies" are real copies, so the switch's bookkeeping (which storage each
expert's parameters point at) runs and is checked; pinned memory, the asynchronous copy and the device memory it
frees are CUDA-only (the `gpu` test). Bad checkpoints and keys fail before any weight loads.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from _runs import latents_of, rel_err  # noqa: E402
from _wan_checkpoint import FLOW_SHIFT, write_two_expert_checkpoint  # noqa: E402
from tessera.launch.config import help_text, load_preset, resolve_config  # noqa: E402
from tessera.launch.generate import main  # noqa: E402
from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_  # noqa: E402
from tessera.models.wan.checkpoint import resolve_checkpoint  # noqa: E402
from tessera.models.wan.vae import WanVAEDecoder  # noqa: E402
from tessera.runtime.config import GenerateConfig, ModelConfig  # noqa: E402
from tessera.runtime.experts import Experts, build_expert_schedule  # noqa: E402
from tessera.runtime.preflight import choose_expert_offload, estimate_request_memory  # noqa: E402
from tessera.runtime.samplers import build_sampler  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPT, NEGATIVE = "a red fox running through fresh snow", "blurry low quality"
# FLOW_SHIFT 2.0 and 3 steps give the timesteps [999, 800, 500]: with boundary 0.8 the middle step sits exactly on
# the boundary, which diffusers' `t >= boundary_ratio * 1000` gives to the high-noise expert.
BOUNDARY = 0.8
RUN = dict(num_frames=9, height=32, width=48, num_steps=3, guidance_scale=5.0, guidance_scale_2=2.0, seed=3)
ARGS = [f"{k}={v}" for k, v in RUN.items()] + [
    f"prompt={PROMPT}", f"negative_prompt={NEGATIVE}", "attention.backend=dense", "output.save_latents=true"
]
# A wrong switch misses the reference by more than this; the right one is within 1e-4 (measured: 3e-7). Measured
# misses: one guidance scale for both experts 1.9e-3 (only the last step's scale differs), `>` for `>=` 0.26, the
# experts swapped 0.11.
WRONG = 1e-3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_two_expert_checkpoint(tmp_path_factory.mktemp("wan22") / "Wan2.2-tiny-Diffusers", BOUNDARY)


@pytest.fixture(scope="module")
def diffusers_pipe(ckpt):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(ckpt))


def diffusers_latents(pipe, output_type: str = "latent", **overrides):
    """diffusers' final latents (or, output_type="np", its frames in [0, 1]) for RUN with `overrides`."""
    run = {**RUN, **overrides}
    return pipe(
        PROMPT, NEGATIVE, height=run["height"], width=run["width"], num_frames=run["num_frames"],
        num_inference_steps=run["num_steps"], guidance_scale=run["guidance_scale"],
        guidance_scale_2=run["guidance_scale_2"], generator=torch.Generator("cpu").manual_seed(run["seed"]),
        output_type=output_type,
    ).frames


@pytest.fixture(scope="module")
def reference(diffusers_pipe) -> torch.Tensor:
    return diffusers_latents(diffusers_pipe)


@pytest.fixture(scope="module")
def one_rank(ckpt, tmp_path_factory) -> tuple[torch.Tensor, dict]:
    """Our CLI at 1 rank, both experts resident: (final latents, report)."""
    rc, out = run_main(tmp_path_factory.mktemp("one"), "one", ckpt)
    assert rc == 0
    return latents_of(out), json.loads(out.with_suffix(".json").read_text())


def run_main(tmp_path: Path, name: str, path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / f"{name}.mp4"
    return main([*ARGS, f"model.path={path}", f"output.path={out}", *extra]), out


def test_checkpoint_carries_the_second_expert_and_the_boundary(ckpt):
    info = resolve_checkpoint(ckpt)
    assert info.weights == ckpt / "transformer" and info.weights_2 == ckpt / "transformer_2"
    assert info.boundary_ratio == BOUNDARY and info.flow_shift == FLOW_SHIFT
    assert load_file(str(info.weights / "diffusion_pytorch_model.safetensors"))["proj_out.weight"].ne(
        load_file(str(info.weights_2 / "diffusion_pytorch_model.safetensors"))["proj_out.weight"]).any()


def test_one_rank_matches_diffusers_and_a_wrong_switch_does_not(one_rank, reference, diffusers_pipe):
    ours, report = one_rank
    assert rel_err(ours, reference) < 1e-4
    experts = report["experts"]
    assert experts["expert_per_step"] == ["transformer", "transformer", "transformer_2"]  # t = 999, 800, 500
    assert experts["guidance_scale_per_step"] == [5.0, 5.0, 2.0] and experts["boundary_timestep"] == 800.0
    assert report["config"]["guidance_scale_2"] == 2.0 and report["config"]["model"]["boundary_ratio"] == BOUNDARY
    assert [e["component"] for e in report["weights"]["experts"]] == ["transformer", "transformer_2"]
    assert experts["offloaded"] is False and experts["moves"] == [] and experts["move_seconds"] == 0.0

    pipe = diffusers_pipe
    assert rel_err(ours, diffusers_latents(pipe, guidance_scale_2=None)) > WRONG  # one scale for both experts
    pipe.transformer, pipe.transformer_2 = pipe.transformer_2, pipe.transformer
    try:
        swapped = diffusers_latents(pipe)  # the experts' roles swapped
    finally:
        pipe.transformer, pipe.transformer_2 = pipe.transformer_2, pipe.transformer
    assert rel_err(ours, swapped) > WRONG
    pipe.register_to_config(boundary_ratio=BOUNDARY + 1e-4)  # as `t > boundary`: step 1 to the low-noise expert
    try:
        strict = diffusers_latents(pipe)
    finally:
        pipe.register_to_config(boundary_ratio=BOUNDARY)
    assert rel_err(ours, strict) > WRONG


def test_decoded_frames_match_diffusers(ckpt, one_rank, diffusers_pipe):
    """Our VAE decode of our final latents against diffusers' whole pipeline with output_type="np"."""
    frames = WanVAEDecoder(ckpt / "vae", device=torch.device("cpu")).decode_float(one_rank[0])
    ref = torch.from_numpy(diffusers_latents(diffusers_pipe, output_type="np"))
    assert frames.shape == ref.shape == (1, RUN["num_frames"], RUN["height"], RUN["width"], 3) and ref.std() > 0.05
    assert (frames - ref).abs().max().item() < 1e-3


def test_offloaded_experts_give_bit_identical_latents(ckpt, one_rank):
    """The Python API with model.offload_experts=true against the CLI's resident experts (same code path below)."""
    import tessera

    expected = one_rank[0]
    keys = {**RUN, "prompt": PROMPT, "negative_prompt": NEGATIVE}
    with tessera.load(model={"path": str(ckpt), "offload_experts": "true"}, attention={"backend": "dense"}) as pipe:
        experts = pipe._pipe.experts
        first = pipe.generate(**keys)
        assert torch.equal(first.latents, expected)
        report = first.report["experts"]
        assert report["offloaded"] is True and report["bytes_per_move"] > 0
        assert [(m["step"], m["expert"]) for m in report["moves"]] == [(0, "transformer"), (2, "transformer_2")]
        # After the switch the high-noise expert points at its host copies again, the low-noise one at new copies.
        assert experts.active == 1 and _points_at_host(experts, 0) and _points_at_none_of_host(experts, 1)
        again = pipe.generate(**keys)  # the high-noise expert moves back at step 0: its weights intact
        assert torch.equal(again.latents, expected)
        assert [(m["step"], m["expert"]) for m in again.report["experts"]["moves"]][0] == (0, "transformer")
        scale_3 = pipe.generate(**{**keys, "guidance_scale_2": 3.0})  # a per-request key
        assert scale_3.report["experts"]["guidance_scale_per_step"] == [5.0, 5.0, 3.0]


def _points_at_host(experts: Experts, index: int) -> bool:
    host = experts._host[index]
    return all(p.data_ptr() == host[name].data_ptr() for name, p in experts.models[index].named_parameters())


def _points_at_none_of_host(experts: Experts, index: int) -> bool:
    host = experts._host[index]
    return all(p.data_ptr() != host[name].data_ptr() for name, p in experts.models[index].named_parameters())


@pytest.mark.multirank
def test_two_ranks_with_offloaded_experts_match_diffusers(ckpt, reference, tmp_path):
    out = tmp_path / "sp2.mp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "generate.py"), *ARGS, f"model.path={ckpt}", f"output.path={out}", "parallel.sp=2",
           "model.offload_experts=true"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert rel_err(latents_of(out), reference) < 1e-4
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["sp"] == 2 and report["experts"]["offloaded"] is True


def _fail_if_building(*args, **kwargs):
    raise AssertionError("a model was built before the configuration error")


def _one_expert(root: Path) -> None:
    shutil.rmtree(root / "transformer_2")
    _set_index(root, boundary_ratio=None, transformer_2=[None, None])


def _set_index(root: Path, **entries) -> None:
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, **entries}))


def _other_layers(root: Path) -> None:
    config = json.loads((root / "transformer_2" / "config.json").read_text())
    (root / "transformer_2" / "config.json").write_text(json.dumps({**config, "num_layers": 1}))


@pytest.mark.parametrize(("change", "extra", "expected"), [
    (_one_expert, ["guidance_scale_2=2.0"], ["guidance_scale_2=2.0", "one expert", "Fix: drop guidance_scale_2"]),
    (lambda root: _set_index(root, boundary_ratio=None), [], ["transformer_2/", "model_index.json", "boundary_ratio"]),
    (lambda root: shutil.rmtree(root / "transformer_2"), [], ["boundary_ratio=0.8", "transformer_2/config.json"]),
    (_other_layers, [], ["the two experts differ", "num_layers: transformer/ 2 vs transformer_2/ 1"]),
    (_one_expert, ["guidance_scale_2=null", "model.boundary_ratio=0.9"], ["model.boundary_ratio=0.9", "has one"]),
    (None, ["model.boundary_ratio=null"], ["model.boundary_ratio=null", "two experts"]),
    (None, ["guidance_scale=1"], ["guidance_scale_2=2.0 with guidance_scale=1"]),
    (_one_expert, ["guidance_scale_2=null", "model.offload_experts=true"], ["model.offload_experts=true"]),
])
def test_bad_checkpoints_and_keys_fail_before_any_model_is_built(ckpt, tmp_path, monkeypatch, capsys, change, extra,
                                                                  expected):
    path = ckpt
    if change is not None:
        path = tmp_path / "changed"
        shutil.copytree(ckpt, path)
        change(path)
    monkeypatch.setattr("tessera.models.wan.family.build_wan_on_meta", _fail_if_building)
    rc, out = run_main(tmp_path, "bad", path, *extra)
    err = capsys.readouterr().err
    assert rc == 2 and all(text in err for text in expected), err
    assert not out.exists()


def _fake_a14b(root: Path, experts: int) -> Path:
    """A checkpoint with the A14B architecture in its configs but tiny weight files: enough to resolve the config."""
    preset_arch = load_preset("wan2.2-t2v-a14b")[0]
    config = {"_class_name": "WanTransformer3DModel", **preset_arch, "patch_size": list(preset_arch["patch_size"])}
    for name in ("transformer", "transformer_2")[:experts]:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
        save_file({"proj_out.bias": torch.zeros(1)}, str(root / name / "diffusion_pytorch_model.safetensors"))
    index = {"_class_name": "WanPipeline", "boundary_ratio": 0.875 if experts == 2 else None}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_a14b_checkpoint_gets_the_wan22_preset(tmp_path):
    two = _fake_a14b(tmp_path / "a14b", experts=2)
    cfg, _ = resolve_config([f"model.path={two}"])
    assert cfg.model.preset == "wan2.2-t2v-a14b" and cfg.model.boundary_ratio == 0.875
    assert (cfg.guidance_scale, cfg.guidance_scale_2, cfg.num_steps, cfg.flow_shift) == (4.0, 3.0, 40, 12.0)
    assert (cfg.num_frames, cfg.height, cfg.width) == (81, 720, 1280)
    (two / "scheduler").mkdir()
    (two / "scheduler" / "scheduler_config.json").write_text(json.dumps({"flow_shift": 3.0}))
    assert resolve_config([f"model.path={two}"])[0].flow_shift == 3.0  # diffusers' conversion: the checkpoint wins
    with pytest.raises(ValueError, match="experts: preset 1 vs checkpoint 2"):
        resolve_config([f"model.path={two}", "model.preset=wan2.1-t2v-14b"])
    dmd, _ = resolve_config([f"model.path={two}", "scheduler=dmd"])
    assert dmd.guidance_scale == 1.0 and dmd.guidance_scale_2 is None  # DMD: no CFG for either expert
    with pytest.raises(ValueError, match="guidance_scale_2 cannot be set with scheduler=dmd"):
        resolve_config([f"model.path={two}", "scheduler=dmd", "guidance_scale_2=2"])
    one = _fake_a14b(tmp_path / "a14b-one", experts=1)
    assert resolve_config([f"model.path={one}"])[0].model.preset == "wan2.1-t2v-14b"
    with pytest.raises(ValueError, match="experts: preset 2 vs checkpoint 1"):
        resolve_config([f"model.path={one}", "model.preset=wan2.2-t2v-a14b"])
    line = next(line for line in help_text(["model.preset=wan2.2-t2v-a14b"]).splitlines() if "guidance_scale_2" in line)
    assert "low-noise expert" in line and "(default: 3.0)" in line


def test_schedule_follows_diffusers_rule():
    cfg = GenerateConfig(model=ModelConfig(boundary_ratio=BOUNDARY), num_steps=3, flow_shift=FLOW_SHIFT,
                         guidance_scale=5.0, guidance_scale_2=2.0)
    timesteps = build_sampler(cfg).timesteps
    assert timesteps.tolist() == [999, 800, 500]
    schedule = build_expert_schedule(cfg, timesteps, num_experts=2)
    assert schedule.expert_per_step == (0, 0, 1) and schedule.guidance_per_step == (5.0, 5.0, 2.0)
    assert schedule.switch_steps == {0, 2} and schedule.boundary_timestep == 800.0
    same_scale = build_expert_schedule(replace(cfg, guidance_scale_2=None), timesteps, num_experts=2)
    assert same_scale.guidance_per_step == (5.0, 5.0, 5.0)  # guidance_scale_2 unset: guidance_scale
    one = build_expert_schedule(replace(cfg, model=ModelConfig()), timesteps, num_experts=1)
    assert one.expert_per_step == (0, 0, 0) and one.switch_steps == {0} and one.boundary_timestep is None


def test_offload_moves_tensors_not_modules():
    arch = WanConfig(num_attention_heads=2, attention_head_dim=8, ffn_dim=16, num_layers=1, text_dim=8, freq_dim=8)
    experts = Experts(torch.device("cpu"), offload=True)
    for seed in (0, 1):
        model = build_wan_on_meta(arch)
        materialize_random_(model, seed=seed, device="cpu", dtype=torch.float32)
        experts.add(model)
    params = [list(model.parameters()) for model in experts.models]
    assert _points_at_host(experts, 0) and _points_at_host(experts, 1) and experts.active is None
    with torch.inference_mode():  # as in the denoising loop
        assert experts.activate_synced(1) >= 0.0
    assert _points_at_none_of_host(experts, 1) and not any(p.is_inference() for p in experts.models[1].parameters())
    assert experts.activate_synced(1) == 0.0  # already there
    experts.activate_synced(0)
    assert _points_at_host(experts, 1) and _points_at_none_of_host(experts, 0)
    same = [a is b for model, old in zip(experts.models, params, strict=True) for a, b in zip(model.parameters(), old,
                                                                                              strict=True)]
    assert all(same)  # the same Parameter objects: request states and compiled stages built on them stay valid
    assert all(torch.equal(p, experts._host[0][name]) for name, p in experts.models[0].named_parameters())


def test_memory_estimate_counts_the_resident_experts(monkeypatch):
    arch = WanConfig(**load_preset("wan2.2-t2v-a14b")[0])
    cfg = GenerateConfig(model=ModelConfig(boundary_ratio=0.875, offload_experts="false"), num_frames=17)
    both = estimate_request_memory(cfg, arch, sp=1, rank=0)
    one = estimate_request_memory(replace(cfg, model=replace(cfg.model, offload_experts="true")), arch, sp=1, rank=0)
    assert both.weights == 2 * one.weights and both.experts == 2 and "DiT weights (2 experts)" in both.describe()
    assert estimate_request_memory(replace(cfg, model=replace(cfg.model, offload_experts="auto")), arch, sp=1,
                                   rank=0).experts == 1  # auto: at least one expert must fit
    auto = replace(cfg, model=replace(cfg.model, offload_experts="auto"))
    assert choose_expert_offload(auto, arch, torch.device("cpu"), sp=1, rank=0)[0] is False  # CPU: same memory
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr("tessera.runtime.preflight.available_memory", lambda device: (both.peak - 1, "free memory"))
    offload, why = choose_expert_offload(auto, arch, gpu, sp=1, rank=0)
    assert offload and "both experts do not fit" in why
    monkeypatch.setattr("tessera.runtime.preflight.available_memory", lambda device: (both.peak, "free memory"))
    assert choose_expert_offload(auto, arch, gpu, sp=1, rank=0)[0] is False


@pytest.mark.gpu
def test_offloaded_experts_on_cuda_give_bit_identical_latents_and_free_device_memory():
    """Pinned host copies, the asynchronous copy to the device and the memory an offloaded expert leaves free."""
    import tessera

    keys = dict(num_steps=4, num_frames=9, height=64, width=64, seed=1)
    load = dict(model={"boundary_ratio": 0.9}, attention={"backend": "dense"})
    before = torch.cuda.memory_allocated()
    with tessera.load(**load) as resident:
        resident_bytes = torch.cuda.memory_allocated() - before
        expected = resident.generate(**keys)
    del resident
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    with tessera.load(**{**load, "model": {**load["model"], "offload_experts": "true"}}) as offloaded:
        offloaded_bytes = torch.cuda.memory_allocated() - before
        got = offloaded.generate(**keys)
        experts = offloaded._pipe.experts
        assert all(t.is_pinned() for host in experts._host for t in host.values())
        assert offloaded_bytes <= resident_bytes - experts.expert_bytes()  # one expert fewer on the device
    assert torch.equal(got.latents, expected.latents)
    assert got.report["experts"]["offloaded"] and len(got.report["experts"]["moves"]) == 2
