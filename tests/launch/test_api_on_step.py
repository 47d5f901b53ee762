"""`VideoPipeline.generate(on_step=...)`, the per-step hook behind the server's progress and cancel; the fault spec's
`seed=` selector (one job of a server); the bounded prompt cache of a long-lived pipeline. One rank, CPU."""

from __future__ import annotations

import pytest
import tessera
import torch
from tessera.runtime.faults import InjectedFault, parse_fault_spec
from tessera.runtime.pipeline import MAX_CACHED_PROMPTS


@pytest.fixture(scope="module")
def pipe():
    with tessera.load(num_frames=5, height=32, width=32, num_steps=3) as p:
        yield p


def test_on_step_sees_every_step_and_cancel_stops_at_the_boundary(pipe):
    seen: list[tuple[int, int]] = []
    full = pipe.generate(seed=1, on_step=lambda step, num_steps: seen.append((step, num_steps)))
    assert seen == [(0, 3), (1, 3), (2, 3)] and pipe.phase == "decode"

    def stop_after_step_1(step: int, num_steps: int) -> None:
        if step == 1:
            raise tessera.Cancelled(step)

    with pytest.raises(tessera.Cancelled, match="cancelled after denoising step 1"):
        pipe.generate(seed=1, on_step=stop_after_step_1)
    assert pipe.phase == "step 1"
    again = pipe.generate(seed=1)  # the pipeline carries on, with the same result
    assert torch.equal(again.latents, full.latents) and again.frames.shape == (5, 32, 32, 3)


def test_fault_seed_limits_a_fault_to_the_requests_with_that_seed():
    plan = parse_fault_spec("nan@step=1,seed=13;raise@phase=decode,rank=0;override@rank=1,seed=9")
    assert plan.for_seed(13).step_faults(0).keys() == {1} and plan.for_seed(12).step_faults(0) == {}
    with pytest.raises(InjectedFault):
        plan.for_seed(12).fire_phase("decode", 0)  # no seed=: every request
    assert plan.overrides_for(1) == ["seed=9"]  # an override's seed stays an override


def test_prompt_cache_keeps_the_newest_prompts(pipe):
    inner = pipe._pipe
    first = inner.encode(["prompt 0"]).clone()
    for i in range(MAX_CACHED_PROMPTS + 10):
        inner.encode([f"prompt {i}"])
    assert len(inner._embeddings) == MAX_CACHED_PROMPTS and "prompt 0" not in inner._embeddings
    assert torch.equal(inner.encode(["prompt 0"]), first)  # re-encoded alike
