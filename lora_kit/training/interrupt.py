"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (schedulers, `docker stop`) without losing work.

The CLI installs the handler around a training stage (`handled`). While a training loop runs (`arm`), the first signal
only sets a flag: the loop stops at the next step boundary after writing its usual checkpoint (`StopCallback` for the
transformers Trainer; PPO's own loop asks `requested`), and the stage ends in `Interrupted` before its final save, so
the run stays unfinished and `resume=true` continues it. The CLI prints how to resume and exits 128 + the signal
number (130, 143). A second signal, or one outside a training loop, aborts at once. A SIGINT that the parent process
ignores (a background job of a non-interactive shell) stays ignored.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
_state = {"armed": False, "signal": None}


class Interrupted(KeyboardInterrupt):
    """A run stopped by `signum`: `checkpoint` is the checkpoint it wrote at the step boundary, None when it aborted
    at once. A KeyboardInterrupt, so code that handles Ctrl-C handles it and `except Exception` does not swallow it."""

    def __init__(self, signum: int, checkpoint: Optional[str] = None):
        super().__init__(NAMES.get(signum, str(signum)))
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def _on_signal(signum, frame) -> None:
    if _state["armed"] and _state["signal"] is None:
        _state["signal"] = signum
        if int(os.environ.get("RANK", "0")) == 0:
            again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
            print(f"\nlorakit: {NAMES[signum]} received: stopping after this step and saving a checkpoint "
                  f"({again} aborts at once)", file=sys.stderr, flush=True)
        return
    raise Interrupted(signum)


@contextmanager
def handled():
    """Around a training command: SIGINT and SIGTERM come here (off the main thread, where Python cannot install
    handlers, nothing changes). The previous handlers are back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in NAMES}
    for s in NAMES:
        if old[s] is not signal.SIG_IGN:
            signal.signal(s, _on_signal)
    _state.update(armed=False, signal=None)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state.update(armed=False, signal=None)


def arm(on: bool = True) -> None:
    """Mark a training loop as running (`on`) or not: only then does the first signal wait for the step boundary."""
    _state["armed"] = on


def requested() -> Optional[int]:
    """The signal that asked this run to stop, or None. Across processes (torchrun) every rank gets the same answer
    (a signal may reach the ranks at different steps), so call it on every rank at the same point of each step."""
    mine = _state["signal"]
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([mine or 0], device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = int(flag.item()) or None
    if agreed is not None and mine is None:
        _state["signal"] = agreed
    return agreed


def stop(checkpoint: Optional[str]) -> None:
    """End the stage after a requested stop (its checkpoint written): raise Interrupted. No-op without a request."""
    if _state["signal"] is not None:
        arm(False)
        raise Interrupted(_state["signal"], checkpoint)


class StopCallback(TrainerCallback):
    """A signal during training: save a checkpoint at the end of the current step and stop (the Trainer's own
    checkpoint, so resume_from_checkpoint continues it), then end the stage in Interrupted instead of returning."""

    def on_train_begin(self, args, state, control, **kw):
        arm()

    def on_step_end(self, args, state, control, **kw):
        if requested() is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kw):
        arm(False)
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        stop(str(checkpoint) if checkpoint.is_dir() else None)
