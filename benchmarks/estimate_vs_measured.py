"""`lorakit estimate` against measured memory on CPU: each case runs in a fresh process that loads the model the way the
stages do (lora_kit.models), takes AdamW steps, and reads its resident set size (RSS) at each stage.

  weights           RSS growth from loading the model (+ attaching LoRA)
  training state    RSS growth from one tiny step (1 x 8 tokens): gradients + AdamW states
  activations       peak RSS (VmHWM, reset first) growth during one forward+backward of batch x seq_len tokens

glibc's malloc is told to return every block >= 64 KiB to the system (MALLOC_MMAP_THRESHOLD_) so that freed tensors do
not stay in the RSS. Run: flock /tmp/lorakit-heavy.lock python benchmarks/estimate_vs_measured.py [--model smollm2-135m]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = {  # name: (method, dtype, batch, seq_len, lora dropout)
    "full-fp32": ("full", "fp32", 1, 256, 0.0),
    "lora-fp32": ("lora", "fp32", 2, 256, 0.0),
    "lora-fp32-dropout": ("lora", "fp32", 2, 256, 0.05),
    "lora-bf16": ("lora", "bf16", 2, 256, 0.0),
    "qlora-bf16": ("qlora", "bf16", 2, 256, 0.0),
}


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak() -> int:
    """The process's peak RSS since the last reset_peak() (Linux VmHWM)."""
    import re

    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def reset_peak() -> None:
    """Restart the peak at the current RSS, so transients of loading or of AdamW's first step do not hide it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def warm_up(model_dir: str, method: str, dtype: str) -> None:
    """Load, wrap and step a 2-layer copy of the model once, so the baseline already holds every imported module and
    kernel; what grows afterwards is the real model's memory."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_kit.models.load import load_model
    from lora_kit.models.lora import attach_lora
    from lora_kit.recipe import LoraArgs

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.num_hidden_layers, cfg.vocab_size = 2, 512
    with tempfile.TemporaryDirectory() as d:
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        model = load_model(d, quantization="4bit" if method == "qlora" else "none", dtype=dtype)
        model = attach_lora(model, LoraArgs(r=8, alpha=16, dropout=0.05, target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(input_ids=torch.ones(1, 8, dtype=torch.long), labels=torch.ones(1, 8, dtype=torch.long)).loss
        loss.backward()
        opt.step()
        del model, opt, loss


def measure(model_dir: str, case: str) -> dict:
    """Runs inside the child process."""
    import torch

    from lora_kit.models.load import load_model
    from lora_kit.models.lora import attach_lora
    from lora_kit.recipe import LoraArgs

    method, dtype, batch, seq, dropout = CASES[case]
    torch.manual_seed(0)
    warm_up(model_dir, method, dtype)
    r0 = rss()
    model = load_model(model_dir, quantization="4bit" if method == "qlora" else "none", dtype=dtype)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = attach_lora(model, LoraArgs(r=8, alpha=16, dropout=dropout, target_modules="all-linear"))
    model.train()
    with torch.no_grad():  # safetensors weights may still be file pages mapped lazily: touch every one
        for t in list(model.parameters()) + list(model.buffers()):
            t.view(-1)[:: max(1, 1024 // t.element_size())].sum() if t.numel() else None
    r1 = rss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)  # what the Trainer builds (adamw_torch)
    vocab = model.config.vocab_size
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")  # Trainer bf16=True

    def step(b: int, s: int, update: bool):
        ids = torch.randint(3, vocab, (b, s))
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if update:
            opt.step()

    step(1, 8, update=True)  # allocates gradients and AdamW states; they stay (no zero_grad)
    r2 = rss()
    reset_peak()
    step(batch, seq, update=False)  # gradients accumulate into the existing buffers
    p3 = peak()
    return {"weights": r1 - r0, "state": r2 - r1, "activations": p3 - r2, "rss_base": r0}


def predicted(model_dir: str, case: str) -> dict:
    from lora_kit.models.estimate import Setup, estimate, load_shape

    method, dtype, batch, seq, dropout = CASES[case]
    shape, _ = load_shape(model_dir)
    e = estimate(shape, Setup(method=method, dtype=dtype, seq_len=seq, batch=batch, lora_dropout=dropout,
                              lora_r=8, device="cpu"))
    return {"weights": e.weights, "state": e.gradients + e.optimizer, "activations": e.activations}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from lora_kit.models.load import resolve_model

    model_dir = resolve_model(args.model)
    if args.child:
        print(json.dumps(measure(model_dir, args.child)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    mib = 2 ** 20
    print(f"model {args.model} ({model_dir})")
    print(f"{'case':<18} {'component':<12} {'estimate MiB':>12} {'measured MiB':>13} {'est/meas':>9}")
    for case in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", case], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{case}: failed\n{out.stderr[-2000:]}")
            continue
        got = json.loads(out.stdout.strip().splitlines()[-1])
        want = predicted(model_dir, case)
        for k in ("weights", "state", "activations"):
            ratio = want[k] / got[k] if got[k] else float("nan")
            print(f"{case:<18} {k:<12} {want[k] / mib:12.1f} {got[k] / mib:13.1f} {ratio:9.3f}")
        ws = want["weights"] + want["state"]
        gs = got["weights"] + got["state"]
        print(f"{case:<18} {'w+grad+opt':<12} {ws / mib:12.1f} {gs / mib:13.1f} {ws / gs:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
