"""GRPO's held-out effect: `lorakit grpo --recipe grpo_zh` from a sentiment SFT adapter with the verifiable sentiment
(+ format) reward; prints the held-out accuracy curve (greedy answers on the 200 `zh_sentiment_test` reviews, never
trained on) with its binomial standard error, the KL to the SFT reference and the completion length, per seed.

    flock /tmp/lorakit-heavy.lock python benchmarks/grpo_sentiment.py [--sft DIR] [--seeds 42] [--steps 40]

Without --sft it first trains the starting adapter: `lorakit sft --recipe alpaca_zh data=zh_sentiment_train
max_steps=12 learning_rate=3e-4` (a deliberately short SFT, so the start is below the ceiling).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path


def rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", help="starting adapter (default: train one into WORKDIR/sft)")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workdir", default="/tmp/lorakit-grpo-sentiment")
    ap.add_argument("extra", nargs="*", help="more key=value overrides for lorakit grpo")
    args = ap.parse_args()
    work = Path(args.workdir)
    lorakit = [sys.executable, "-m", "lora_kit.cli"]
    sft = Path(args.sft) if args.sft else work / "sft"
    if not (sft / "run.json").is_file():
        subprocess.run(lorakit + ["sft", "--recipe", "alpaca_zh", "data=zh_sentiment_train", f"output_dir={sft}",
                                  "max_steps=12", "save_steps=100", "learning_rate=3e-4", "force=true"], check=True)
    for seed in args.seeds.split(","):
        out = work / f"grpo-seed{seed}"
        subprocess.run(lorakit + ["grpo", "--recipe", "grpo_zh", f"sft_adapter={sft}", f"output_dir={out}",
                                  f"seed={seed}", f"max_steps={args.steps}", "force=true", *args.extra], check=True)
        m = rows(out)
        n = json.loads((out / "run.json").read_text())["held_out_prompts"]
        train = [r for r in m if "kl" in r]
        print(f"\nseed {seed}: held-out sentiment accuracy on {n} reviews (greedy), s.e. = sqrt(p(1-p)/n)")
        print("step | accuracy | s.e. | format | han_share | train KL (per token, last logged) | completion length")
        for r in (r for r in m if "eval_reward/sentiment" in r):
            p = r["eval_reward/sentiment"]
            near = [t for t in train if t["step"] <= r["step"]]
            kl = f"{near[-1]['kl']:.4f}" if near else "-"
            length = f"{near[-1]['completions/mean_length']:.1f}" if near else "-"
            fmt = f"{r['eval_reward/format']:.3f}" if "eval_reward/format" in r else "-"
            print(f"{r['step']:4d} | {p:.3f} | {math.sqrt(p * (1 - p) / n):.3f} | {fmt} | "
                  f"{r['eval_reward/han_share']:.3f} | {kl} | {length}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
