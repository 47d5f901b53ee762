"""Generate a video: `torchrun --nproc_per_node=N launch/generate.py key=value ...` (or plain `python`).

Resolves and validates the config on every rank before any process group exists, sets up the process group
and the (cfg, sp) mesh from torchrun's environment, runs the orchestrator and always destroys the group.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.config import help_text, resolve_config  # noqa: E402
from runtime import (  # noqa: E402
    build_mesh,
    destroy_process_group_safely,
    generate,
    init_process_group_from_env,
)

COLLECTIVE_TIMEOUT_S = 600.0
EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text())
        return 0
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(levelname)s %(message)s",
    )
    try:
        cfg, arch = resolve_config(argv)
        cfg.validate(world_size=world_size)
    except (ValueError, TypeError) as err:
        return _user_error(rank, err)

    try:
        _, _, _, device = init_process_group_from_env(COLLECTIVE_TIMEOUT_S)
        mesh = build_mesh(cfg=cfg.parallel.cfg, sp=cfg.parallel.sp, device=device)
        generate(cfg, arch, mesh)
    except (ValueError, FileExistsError) as err:  # user errors found while building; bugs keep tracebacks
        return _user_error(rank, err)
    finally:
        destroy_process_group_safely()
    return 0


def _user_error(rank: int, err: Exception) -> int:
    if rank == 0:
        print(f"error: {err}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
