"""Peak RSS of `lorakit ppo` (actor, critic, reference and reward on one base) against `lorakit sft` on the same model
and batch: 8 sequences of ~128 tokens, LoRA r8 all-linear, fp32 weights on CPU. Each run is its own process; the peak
is the child's ru_maxrss from wait4. Target (issue 5): PPO peak <= 1.6x SFT peak.

    flock /tmp/lorakit-heavy.lock python benchmarks/ppo_memory.py [--model smollm2-135m] [--workdir /tmp/ppo-mem]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def peak_rss_mib(cmd: list[str]) -> float:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workdir", default="/tmp/lorakit-ppo-memory")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lorakit = [sys.executable, "-m", "lora_kit.cli"]
    common = [f"model={args.model}", f"dtype={args.dtype}", "lora.r=8", "lora.target_modules=all-linear", "seed=0"]
    # a reward adapter to load (one step is enough: memory does not depend on its quality)
    subprocess.run(lorakit + ["rm", "--recipe", "rm_zh", *common, f"output_dir={work / 'rm'}", "max_steps=1",
                              "eval_fraction=0", "max_samples=16"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    sft = peak_rss_mib(lorakit + ["sft", "--recipe", "alpaca_zh", *common, f"output_dir={work / 'sft'}",
                                  "cutoff_len=128", "packing=true", "batch_size=8", "max_steps=3", "save_steps=100"])
    ppo = peak_rss_mib(lorakit + ["ppo", "--recipe", "ppo_zh", *common, f"output_dir={work / 'ppo'}",
                                  f"reward_adapter={work / 'rm'}", "batch_size=8", "mini_batch_size=8",
                                  "max_new_tokens=96", "max_steps=2", "ppo_epochs=1", "eval_fraction=0",
                                  "save_steps=100"])
    print(f"model {args.model}, batch 8 x ~128 tokens, dtype {args.dtype}")
    print(f"sft peak RSS {sft:.0f} MiB")
    print(f"ppo peak RSS {ppo:.0f} MiB (actor + critic + reference + reward on one base)")
    print(f"ratio {ppo / sft:.2f} (target <= 1.6)")
    return 0 if ppo <= 1.6 * sft else 1


if __name__ == "__main__":
    sys.exit(main())
