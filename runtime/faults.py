"""Test-only fault injection: a `TESSERA_FAULT` spec parsed once by launch/ and passed into `generate`.

Faults are `;`-separated, each `kind@key=value,...`; `rank=R` limits one to rank R (default: every rank), `seed=S`
to the requests with that seed (one job of a server); steps are the 0-based denoising step index. See README
"Testing" for the kinds. Nothing here is global: the parsed `FaultPlan` travels as an argument, and the denoising
loop only tests `step in step_faults`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass

import torch

__all__ = ["FAULT_ENV", "NO_FAULTS", "Fault", "FaultPlan", "InjectedFault", "inject_step_faults", "parse_fault_spec"]

FAULT_ENV = "TESSERA_FAULT"
STEP_KINDS = ("raise", "kill", "nan", "sleep")
PHASE_KINDS = {"raise": ("load", "decode", "write"), "enospc": ("write",)}
log = logging.getLogger("tessera")


class InjectedFault(RuntimeError):
    """Raised by a `raise@...` fault."""


@dataclass(frozen=True)
class Fault:
    kind: str  # raise | kill | nan | sleep | enospc | override
    rank: int | None = None  # None: every rank
    step: int | None = None
    phase: str | None = None
    seconds: float = 3600.0  # sleep only
    overrides: tuple[str, ...] = ()  # override only: extra `key=value` arguments for that rank
    seed: int | None = None  # None: every request; else only requests with this seed

    def applies_to(self, rank: int) -> bool:
        return self.rank is None or self.rank == rank


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...] = ()

    def for_seed(self, seed: int) -> FaultPlan:
        """The faults that fire in a request with this seed (those without `seed=` and those with this one)."""
        return FaultPlan(tuple(f for f in self.faults if f.seed is None or f.seed == seed))

    def overrides_for(self, rank: int) -> list[str]:
        """Extra command-line overrides this rank applies (simulates a rank launched with other arguments)."""
        return [o for f in self.faults if f.kind == "override" and f.applies_to(rank) for o in f.overrides]

    def step_faults(self, rank: int) -> dict[int, tuple[Fault, ...]]:
        """step -> faults to fire at the start of that step on `rank`; built once per request."""
        table: dict[int, tuple[Fault, ...]] = {}
        for f in self.faults:
            if f.step is not None and f.applies_to(rank):
                table[f.step] = (*table.get(f.step, ()), f)
        return table

    def fire_phase(self, phase: str, rank: int) -> None:
        """Fire the `raise`/`enospc` faults registered for `phase` ("load", "decode", "write") on `rank`."""
        for f in self.faults:
            if f.phase != phase or not f.applies_to(rank):
                continue
            if f.kind == "enospc":
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV})")
            raise InjectedFault(f"injected fault ({FAULT_ENV}): raise during {phase} on rank {rank}")


NO_FAULTS = FaultPlan()


def inject_step_faults(faults: tuple[Fault, ...], latents: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Fire step faults; returns the (possibly NaN-poisoned) latents."""
    for f in faults:
        if f.kind == "nan":
            latents = latents.clone()
            latents.view(-1)[0] = float("nan")
        elif f.kind == "sleep":
            log.warning("fault injection: rank %d sleeping %.0f s at step %d", rank, f.seconds, step)
            time.sleep(f.seconds)
        elif f.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            raise InjectedFault(f"injected fault ({FAULT_ENV}): raise at step {step} on rank {rank}")
    return latents


def parse_fault_spec(spec: str) -> FaultPlan:
    """Parse e.g. "raise@step=2,rank=1;nan@step=1" (empty -> NO_FAULTS); ValueError naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, args = part.partition("@")
        fields: dict[str, str] = {}
        for item in filter(None, args.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{FAULT_ENV}: {item!r} in {part!r} is not key=value")
            fields[key.strip()] = value.strip()
        rank = int(fields.pop("rank")) if "rank" in fields else None
        if kind == "override":
            if not fields:
                raise ValueError(f"{FAULT_ENV}: {part!r} needs at least one key=value override")
            faults.append(Fault(kind, rank=rank, overrides=tuple(f"{k}={v}" for k, v in fields.items())))
            continue
        step = int(fields.pop("step")) if "step" in fields else None
        seed = int(fields.pop("seed")) if "seed" in fields else None
        phase = fields.pop("phase", None)
        seconds = float(fields.pop("seconds", 3600.0))
        valid_step = kind in STEP_KINDS and step is not None and phase is None
        valid_phase = phase in PHASE_KINDS.get(kind, ()) and step is None
        if fields or not (valid_step or valid_phase):
            raise ValueError(
                f"{FAULT_ENV}: cannot parse {part!r}; use {'|'.join(STEP_KINDS)}@step=N[,rank=R][,seed=S], "
                f"raise@phase=load|decode|write, enospc@phase=write or override@rank=R,key=value"
            )
        faults.append(Fault(kind, rank=rank, step=step, phase=phase, seconds=seconds, seed=seed))
    return FaultPlan(tuple(faults))
