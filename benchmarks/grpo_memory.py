"""Peak RSS of `lorakit grpo` against `lorakit sft` on the same model and batch: 8 sequences of ~128 tokens, LoRA r8
all-linear, fp32, CPU. GRPO: 2 review prompts (`zh_review_prompts`, 55 tokens median in SmolLM2's template) x 4
completions of up to 72 tokens, scored by the share of Han characters; SFT: packed rows of 128 tokens. (The sentiment
prompts of grpo_zh are 142 tokens median, so with them GRPO's batch would be ~40% longer than SFT's.) Each run is its
own process (peak = the child's ru_maxrss). Target (issue 20): GRPO peak <= 1.3x SFT peak.

    flock /tmp/lorakit-heavy.lock python benchmarks/grpo_memory.py [--model smollm2-135m] [--with-reward-model]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from ppo_memory import peak_rss_mib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workdir", default="/tmp/lorakit-grpo-memory")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--with-reward-model", action="store_true", help="also GRPO scored by a `lorakit rm` adapter")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lorakit = [sys.executable, "-m", "lora_kit.cli"]
    common = [f"model={args.model}", f"dtype={args.dtype}", "lora.r=8", "lora.target_modules=all-linear", "seed=0",
              "gradient_checkpointing=false"]
    grpo = ["grpo", "--recipe", "grpo_zh", *common, "batch_size=2", "num_generations=4", "max_new_tokens=72",
            "data=zh_review_prompts", "eval_data=", "rewards=han_share:1", "max_steps=3", "save_steps=100",
            "eval_samples=8", "eval_steps=100"]
    sft = peak_rss_mib(lorakit + ["sft", "--recipe", "alpaca_zh", *common, f"output_dir={work / 'sft'}",
                                  "cutoff_len=128", "packing=true", "batch_size=8", "max_steps=3", "save_steps=100"])
    verifiable = peak_rss_mib(lorakit + grpo + [f"output_dir={work / 'grpo'}"])
    print(f"model {args.model}, batch 8 sequences x ~128 tokens, dtype {args.dtype}")
    print(f"sft peak RSS {sft:.0f} MiB")
    print(f"grpo peak RSS {verifiable:.0f} MiB (verifiable rewards; policy + frozen reference adapter on one base)")
    print(f"ratio {verifiable / sft:.2f} (target <= 1.3)")
    if args.with_reward_model:
        subprocess.run(lorakit + ["rm", "--recipe", "rm_zh", *common, f"output_dir={work / 'rm'}", "max_steps=1",
                                  "eval_fraction=0", "max_samples=16"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        scored = peak_rss_mib(lorakit + grpo + [f"output_dir={work / 'grpo-rm'}", f"reward_adapter={work / 'rm'}",
                                                "rewards=model:1,han_share:1"])
        print(f"grpo + reward model peak RSS {scored:.0f} MiB (a second base for the scorer), ratio {scored / sft:.2f}")
    return 0 if verifiable <= 1.3 * sft else 1


if __name__ == "__main__":
    sys.exit(main())
