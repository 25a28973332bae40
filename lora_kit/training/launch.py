"""`lorakit <stage> ... --nproc N`: start the same command as N processes on this machine through torchrun
(`torch.distributed.run`), which the stages already run under unchanged (transformers Trainer + accelerate do DDP).

Owns only building the torchrun command line and passing its exit code back; no process management of its own.
"""
from __future__ import annotations

import os
import subprocess
import sys

from lora_kit.errors import LorakitError
from lora_kit.models.load import device


def strip_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N` (the workers must not relaunch themselves)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command running `lorakit <argv>` as `nproc` local processes.

    `--standalone` lets torchrun pick a free rendezvous port on localhost, so two runs on one box never collide."""
    if nproc < 1:
        raise LorakitError(f"--nproc must be at least 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(nproc), "-m", "lora_kit.cli", *strip_nproc(argv)]


def worker_env(nproc: int) -> dict[str, str]:
    """The environment for the workers. On CPU each worker gets an equal share of the cores (torchrun would give each
    one thread); a user's OMP_NUM_THREADS wins."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        if device() == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `lorakit <argv>` (with `--nproc` removed) as `nproc` processes; return torchrun's exit code."""
    cmd = torchrun_command(nproc, argv)
    print(f"lorakit: launching {nproc} processes: {' '.join(cmd[1:])}", flush=True)
    try:
        return subprocess.run(cmd, env=worker_env(nproc)).returncode
    except KeyboardInterrupt:  # torchrun forwards the signal to its workers and exits on its own
        return 130
