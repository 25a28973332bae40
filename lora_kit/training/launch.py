"""`lorakit <stage> ... --nproc N`: start the same command as N processes on this machine through torchrun
(`torch.distributed.run`), which the stages already run under unchanged (transformers Trainer + accelerate do DDP).

Owns building the torchrun command line, passing its exit code back, and handing it a stop signal once. torchrun
runs in its own process group: a terminal's Ctrl-C reaches the whole foreground group, so the workers would get SIGINT
from the terminal *and* torchrun's forward of it, and a second SIGINT aborts a worker at once (training/interrupt.py).
Here the first SIGINT or SIGTERM to lorakit goes to torchrun alone, which forwards it to each worker once and waits
(`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, 600 s unless set) while they finish the step and write a checkpoint; a second
signal goes to the whole group, which aborts at once. If lorakit itself dies, torchrun gets SIGTERM (Linux).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

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
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT))
    return env


# Seconds torchrun waits after forwarding a stop signal before it kills the workers (its own default, 30 s, is
# shorter than a large model's step plus its checkpoint).
SHUTDOWN_TIMEOUT = 600


def _own_group_dying_with_parent() -> None:
    """In the torchrun child: a process group of its own, and SIGTERM when lorakit dies (prctl PR_SET_PDEATHSIG)."""
    os.setpgrp()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
        except (OSError, AttributeError):
            pass


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `lorakit <argv>` (with `--nproc` removed) as `nproc` processes; return torchrun's exit code, or 128 + the
    signal that stopped the run (130 SIGINT, 143 SIGTERM), as a single process would."""
    cmd = torchrun_command(nproc, argv)
    print(f"lorakit: launching {nproc} processes: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, env=worker_env(nproc), preexec_fn=_own_group_dying_with_parent)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        try:
            if len(got) == 1:
                proc.send_signal(signum)  # torchrun forwards it to every worker once
            else:
                os.killpg(proc.pid, signum)  # the second one: every worker at once, as a terminal would
        except ProcessLookupError:
            pass

    main = threading.current_thread() is threading.main_thread()  # (only there can Python take signals)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)
           if main and signal.getsignal(s) is not signal.SIG_IGN}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 + got[0] if got else code
