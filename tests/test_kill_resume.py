"""kill -9 in the middle of a run, then resume=true: the result equals an uninterrupted run, bit for bit (CPU fp32)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def sft_args(model_dir, out, *extra):
    return [sys.executable, "-m", "lora_kit.cli", "sft", f"model={model_dir}", "data=zh_sft_mix", f"output_dir={out}",
            "max_samples=96", "cutoff_len=128", "batch_size=2", "max_steps=10", "save_steps=2", "logging_steps=1",
            "dtype=fp32", *extra]


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    full = tmp_path / "full"
    subprocess.run(sft_args(tiny_model_dir, full), check=True, capture_output=True)
    part = tmp_path / "part"
    proc = subprocess.Popen(sft_args(tiny_model_dir, part), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (part / "checkpoints" / "checkpoint-4").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # may land mid-checkpoint: resume must skip a half-written one
    proc.wait()
    assert not (part / "run.json").exists()
    r = subprocess.run(sft_args(tiny_model_dir, part, "resume=true"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "resuming from" in r.stdout
    a, b = load_file(full / "adapter_model.safetensors"), load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, 11))  # no step logged twice


def test_resume_without_checkpoint_or_after_finish(tiny_model_dir, tmp_path):
    from lora_kit.cli import main

    out = tmp_path / "o"
    args = sft_args(tiny_model_dir, out, "max_steps=2")[3:]
    assert main(args) == 0
    assert main(args + ["resume=true"]) == 2  # finished: nothing to resume
    assert main(args) == 2  # finished: refuse to overwrite
