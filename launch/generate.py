"""Generate a video: `torchrun --nproc_per_node=N launch/generate.py key=value ...` (or plain `python`).

Resolves and validates the config on every rank before any process group exists, sets up the process group
and the (cfg, sp) mesh from torchrun's environment, checks that all ranks resolved the same config, runs the
orchestrator and always destroys the group. Failures print `error: rank R failed during <phase>: ...`;
SIGINT/SIGTERM unwind (temp files removed, group destroyed) and exit 128 + the signal number.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator

import torch
from tessera.launch.config import help_text, resolve_requests
from tessera.runtime import (
    build_mesh,
    destroy_process_group_safely,
    generate_many,
    init_process_group_from_env,
)
from tessera.runtime.faults import FAULT_ENV, parse_fault_spec
from tessera.runtime.guards import Interrupted, NonFiniteLatentsError, RankFailure, is_peer_loss, verify_same_config
from tessera.runtime.preflight import preflight_request

EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
ONE_GPU_ENV = "TESSERA_TEST_ONE_GPU"
_PEER_EXIT_GRACE_S = 2.0
_USER_ERRORS = (ValueError, TypeError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the argv: print once
            print(help_text(argv))
        return 0
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(levelname)s %(message)s",
    )
    with _signals_raise_interrupted() as guard:
        try:
            return _run(argv, rank, world_size, guard)
        except Interrupted as err:  # the process group is already destroyed (finally in _run)
            if rank == 0 or err.phase is not None:
                print(f"error: rank {rank} interrupted by {signal.Signals(err.signum).name} during "
                      f"{err.phase or 'config'}; stopped, no output written", file=sys.stderr, flush=True)
            return 128 + err.signum


def _run(argv: list[str], rank: int, world_size: int, guard: _SignalGuard) -> int:
    share_one_gpu = os.environ.get(ONE_GPU_ENV) == "1"  # test-only: every rank on cuda:0 over gloo (README)
    try:
        faults = parse_fault_spec(os.environ.get(FAULT_ENV, ""))  # test-only hook, parsed once (README)
        requests, model_cfg, ckpt = resolve_requests([*argv, *faults.overrides_for(rank)], world_size=world_size)
        cfg = requests[0]
        # Outputs writable and each request within memory: on every rank, before the group or any weights.
        device, sharing = _planned_device(share_one_gpu)
        for request in requests:
            preflight_request(request, model_cfg, rank=rank, device=device, ranks_sharing_device=sharing,
                              checkpoint=ckpt)
    except (ValueError, TypeError) as err:
        return user_error(rank, err)

    try:
        _, _, _, device = init_process_group_from_env(cfg.parallel.timeout_s, share_one_gpu=share_one_gpu)
        verify_same_config(cfg, model_cfg)  # one all_gather_object: a rank with other arguments fails here
        _generate_on_mesh(requests, model_cfg, device, faults, ckpt)
    except RankFailure as failure:
        guard.armed = False  # torchrun's SIGTERM to the survivors must not garble this report
        return _report_failure(rank, failure.phase, failure.cause, cfg.parallel.timeout_s)
    except Exception as err:  # process group, config check or mesh
        guard.armed = False
        return _report_failure(rank, "config", err, cfg.parallel.timeout_s)
    finally:
        destroy_process_group_safely()
    return 0


def _generate_on_mesh(requests, model_cfg, device, faults, ckpt) -> None:
    """Build the mesh, load once and run the requests; the mesh (and its groups) is unreachable once this returns."""
    cfg = requests[0]
    mesh = build_mesh(cfg=cfg.parallel.cfg, sp=cfg.parallel.sp, device=device)
    generate_many(requests, model_cfg, mesh, faults=faults, checkpoint=ckpt)


def _report_failure(rank: int, phase: str, cause: BaseException, timeout_s: float) -> int:
    """Print one `error: rank R ... during <phase>: ...` line (bugs keep their traceback); the exit code."""
    if isinstance(cause, _USER_ERRORS):  # identical on every rank (configs are verified equal): print once
        if rank == 0:
            print(f"error: rank {rank} failed during {phase}: {cause}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    if is_peer_loss(cause):
        message = str(cause).splitlines()[0].split(". This is typically")[0]
        why = f"no answer within parallel.timeout_s={timeout_s:g} s" if "imed out" in message else "connection lost"
        print(f"error: rank {rank} stopped during {phase}: another rank failed, was killed or hung ({why}); its "
              f"error is above or in torchrun's summary. [{message}]", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    if isinstance(cause, NonFiniteLatentsError):  # raised on every rank with the same step
        if rank == 0:
            print(f"error: rank {rank} failed during {phase}: {cause}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    if not isinstance(cause, OSError):  # disk full / unwritable output are not bugs; the rest keep a traceback
        traceback.print_exception(cause)
    print(f"error: rank {rank} failed during {phase}: {type(cause).__name__}: {cause}", file=sys.stderr, flush=True)
    return EXIT_FAILURE


class _SignalGuard:
    """SIGINT/SIGTERM handler: the first signal raises `Interrupted` (while armed), a second exits at once."""

    def __init__(self) -> None:
        self.armed = True
        self.received: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # impatient second Ctrl-C: no more unwinding
        self.received = signum
        if self.armed:
            raise Interrupted(signum)


@contextlib.contextmanager
def _signals_raise_interrupted() -> Iterator[_SignalGuard]:
    """Install `_SignalGuard` for SIGINT and SIGTERM (torchrun forwards both to every worker); restore after."""
    guard = _SignalGuard()
    previous = {sig: signal.signal(sig, guard) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield guard
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _planned_device(share_one_gpu: bool) -> tuple[torch.device, int]:
    """(device this rank will run on, how many ranks of this job share its memory), before any process group:
    torchrun's LOCAL_RANK (never assumed equal to RANK) and LOCAL_WORLD_SIZE."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        return torch.device("cpu"), local_world  # the ranks of one host share its RAM
    if share_one_gpu:
        return torch.device("cuda", 0), local_world
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), 1


def user_error(rank: int, err: Exception) -> int:
    """Rank 0 prints the error (usually every rank found the same one); the others wait a moment before exiting, so
    that torchrun's SIGTERM (sent once any rank exits) does not reach rank 0 before it has printed. A rank that is
    still alive after the wait found an error rank 0 did not (the pre-flight is per rank: its memory, its device):
    it prints it, naming itself, so a one-rank failure is never silent."""
    if rank == 0:
        print(f"error: {err}", file=sys.stderr, flush=True)
    else:
        time.sleep(_PEER_EXIT_GRACE_S)
        print(f"error: rank {rank}: {err}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    exit_code = main()
    # torchrun SIGTERMs the other ranks once one exits: keep our exit code (not -15) during interpreter teardown.
    _teardown_guard = _SignalGuard()
    _teardown_guard.armed = False
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _teardown_guard)
    # Run the exit handlers (logging, weakref finalizers: the encoder's temp files) and leave without the
    # interpreter's teardown: a gloo thread freed there can abort a finished rank ("terminate called without an
    # active exception", SIGABRT), and torchrun then fails the job although every rank succeeded.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
