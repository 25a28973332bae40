"""SIGTERM and SIGINT (Ctrl-C) at a seeded random step of every training stage: the run stops at the next step
boundary, leaves a complete checkpoint at the step it reached (no step trained beyond it), exits 143 / 130 with one
line saying how to continue, and `resume=true` from there ends bitwise equal to an uninterrupted run (CPU fp32). A
second Ctrl-C aborts at once.

The stages, inputs and comparisons are test_kill_resume's; the step each signal waits for comes from a seeded RNG
(LORAKIT_KILL_SEED=N explores others). The children get SIGINT's default handler back: a process started by a
non-interactive parent inherits SIGINT ignored, and lorakit (as every Unix program) leaves an ignored SIGINT ignored.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lora_kit.cli import main
from test_kill_resume import (  # noqa: F401  (inputs and uninterrupted are fixtures)
    STAGES,
    assert_same_run,
    cli,
    inputs,
    logged_steps,
    rng_for,
    subprocess_env,
    uninterrupted,
)

pytestmark = pytest.mark.slow
SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}


def restore_sigint() -> None:
    """In the child: SIGINT as a terminal's Ctrl-C finds it, not ignored as a background job inherits it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env(),
                            preexec_fn=restore_sigint, text=True, errors="replace")


def signal_after(cmd: list[str], ready, signum: int, timeout: float = 300) -> tuple[int, str]:
    """Start `cmd`, wait until `ready()`, send `signum`; return the exit code and stderr. The run must still have been
    running when the signal was sent."""
    proc = start(cmd)
    try:
        deadline = time.time() + timeout
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        running = proc.poll() is None
        proc.send_signal(signum)
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert running, f"the run ended before the signal (exit {proc.returncode}): {err[-1500:]}"
    return proc.returncode, err


def reached(part: Path, stage) -> tuple[Path, int]:
    """(metrics file, steps logged there) of the phase the run was in when it stopped."""
    rows = [(part / rel, logged_steps(part / rel, stage.key)) for rel, _ in stage.watch]
    return [r for r in rows if r[1]][-1]


def complete_checkpoint(root: Path, step: int) -> bool:
    state = root / f"checkpoint-{step}" / "trainer_state.json"
    return state.is_file() and json.loads(state.read_text(encoding="utf-8"))["global_step"] == step


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("name", STAGES)
def test_signal_stops_at_a_step_with_a_checkpoint_and_resume_equals_uninterrupted(name, sig, inputs, uninterrupted,
                                                                                  tmp_path, capsys):
    stage, part, signum = STAGES[name], tmp_path / "part", SIGNALS[sig]
    full = uninterrupted(name)
    # a training step over all phases, not the last; two different ones for the two signals
    target = dict(zip(SIGNALS, rng_for(f"{name}:signals").sample(range(1, sum(n for _, n in stage.watch)), 2)))[sig]
    for rel, n in stage.watch:
        if target <= n:
            break
        target -= n
    code, err = signal_after(cli(*stage.argv(inputs, part)), lambda: logged_steps(part / rel, stage.key) >= target,
                             signum)
    where = f"{sig} after {rel} step {target}"
    assert code == 128 + signum, f"{where}: exit {code}: {err[-1500:]}"
    assert not (part / "run.json").exists(), where  # unfinished: no final adapter, resume continues it

    metrics, steps = reached(part, stage)
    ckpt = metrics.parent / "checkpoints" / f"checkpoint-{steps}"
    assert complete_checkpoint(ckpt.parent, steps), f"{where}: no complete checkpoint at step {steps} reached"
    assert metrics != part / rel or steps >= target, where
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"lorakit {name}: stopped by {signal.Signals(signum).name}; checkpoint saved: {ckpt}"), last
    assert last.endswith(" resume=true") and f"output_dir={part}" in last, last

    capsys.readouterr()
    assert main(stage.argv(inputs, part) + ["resume=true"]) == 0, capsys.readouterr().err[-1500:]
    assert f"resuming from {ckpt}\n" in capsys.readouterr().out, f"{where}: not resumed from the step reached"
    assert_same_run(full, part, where)


def test_second_ctrl_c_aborts_at_once(inputs, tmp_path):
    part = tmp_path / "part"
    proc = start(cli(*STAGES["sft"].argv(inputs, part)))
    try:
        deadline = time.time() + 300
        while logged_steps(part / "metrics.jsonl", "loss") < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        lines = []
        for line in proc.stderr:  # the first Ctrl-C is acknowledged: the run is saving at the step boundary
            lines.append(line)
            if "SIGINT received" in line:
                proc.send_signal(signal.SIGINT)
                break
        err = "".join(lines) + proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-1500:]
    assert "lorakit sft: interrupted (SIGINT)\n" in err and "checkpoint saved" not in err, err[-1500:]
    assert not (part / "run.json").exists()
