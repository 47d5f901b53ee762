"""Unit tests of the fault-injection spec and the failure guards (single process; tests/faults runs them
end to end on torchrun jobs)."""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors.torch import save_file
from tessera.runtime.faults import NO_FAULTS, InjectedFault, inject_step_faults, parse_fault_spec
from tessera.runtime.guards import Progress, checkpoint_identity, first_nonfinite_step_synced, is_peer_loss


def test_fault_spec_parses_every_kind():
    plan = parse_fault_spec("raise@step=2,rank=1; nan@step=0 ;kill@step=1,rank=0;sleep@step=3,seconds=2;"
                            "enospc@phase=write;raise@phase=load,rank=1;override@rank=1,seed=9,prompt=x")
    assert plan.step_faults(0).keys() == {0, 1, 3} and plan.step_faults(1).keys() == {0, 2, 3}
    assert plan.step_faults(1)[3][0].seconds == 2.0
    assert plan.overrides_for(1) == ["seed=9", "prompt=x"] and plan.overrides_for(0) == []
    with pytest.raises(OSError) as info:
        plan.fire_phase("write", 0)
    assert info.value.errno == errno.ENOSPC
    plan.fire_phase("load", 0)  # rank 0 has no load fault
    with pytest.raises(InjectedFault, match="during load on rank 1"):
        plan.fire_phase("load", 1)
    assert parse_fault_spec("") == NO_FAULTS and NO_FAULTS.step_faults(0) == {}


@pytest.mark.parametrize("spec", ["boom@step=1", "raise", "raise@step=1,phase=load", "nan@phase=write",
                                  "enospc@step=1", "raise@step", "override@rank=1", "raise@step=1,color=red"])
def test_bad_fault_spec_is_refused(spec):
    with pytest.raises(ValueError, match="TESSERA_FAULT"):
        parse_fault_spec(spec)


def test_step_faults_poison_or_raise():
    latents = torch.randn(1, 4, 2, 3, 3)
    faults = parse_fault_spec("nan@step=1").step_faults(0)[1]
    poisoned = inject_step_faults(faults, latents, 1, 0)
    assert torch.isfinite(latents).all() and not torch.isfinite(poisoned).all()  # input untouched
    with pytest.raises(InjectedFault, match="step 4 on rank 0"):
        inject_step_faults(parse_fault_spec("raise@step=4").step_faults(0)[4], latents, 4, 0)


def test_progress_names_the_phase():
    progress = Progress()
    assert progress.phase == "config"
    progress.stage, progress.step = "step", 7
    assert progress.phase == "step 7"
    progress.stage = "write"
    assert progress.phase == "write"


def test_first_nonfinite_step_on_one_rank():
    flags = torch.ones(5, dtype=torch.bool)
    assert first_nonfinite_step_synced(flags) is None
    flags[3] = flags[4] = False
    assert first_nonfinite_step_synced(flags) == (3, [0])


def test_checkpoint_identity_tracks_headers_and_sizes(tmp_path):
    assert checkpoint_identity(None) == {}
    save_file({"w": torch.zeros(4)}, tmp_path / "a.safetensors")
    (tmp_path / "config.json").write_text('{"num_layers": 2}')
    before = checkpoint_identity(str(tmp_path))
    assert set(before) == {"a.safetensors", "config.json"}
    assert checkpoint_identity(str(tmp_path)) == before  # deterministic; mtimes are not part of it
    save_file({"w": torch.zeros(5)}, tmp_path / "a.safetensors")  # other shape -> other header
    (tmp_path / "config.json").write_text('{"num_layers": 3}')
    after = checkpoint_identity(str(tmp_path))
    assert after["a.safetensors"] != before["a.safetensors"] and after["config.json"] != before["config.json"]
    assert checkpoint_identity(str(tmp_path / "a.safetensors")).keys() == {"a.safetensors"}


def test_peer_loss_is_recognised():
    assert is_peer_loss(RuntimeError("[pair.cc:537] Read error [127.0.0.1]:4: Connection reset by peer"))
    assert is_peer_loss(RuntimeError("Timed out waiting 5000ms for send operation to complete"))
    assert not is_peer_loss(RuntimeError("shape mismatch"))
    assert not is_peer_loss(ValueError("Connection reset"))
