"""Why PPO on the review prompts drifts into non-Chinese text, and whether starting from a review-writing SFT policy
fixes it (issue 20). Three parts, each printed as a table:

1. The reward model's blind spots: `lorakit rm --recipe rm_zh`, then its mean score (with the standard error) on text
   classes it never trained on, all answering the RM's held-out prompts: held-out positive reviews (chosen), negative
   ones (rejected), English prose (en_heldout), the characters of the positive reviews shuffled (Chinese, but not
   text), and what the PPO start writes (the held-out samples PPO records before its first step).
2. The starting policies: SmolLM2 itself (today's ppo_zh) and a review-writing SFT adapter (`lorakit sft` on the
   training pairs' reviews, both polarities, so PPO has somewhere to go).
3. PPO with that reward model from each start: held-out mean reward before/after with its standard error, KL to the
   reference, share of Han characters; and GRPO with the same reward model from the SFT start (`--grpo`); with
   `--han`, the SFT-start runs again with the share of Han characters added to the reward (`rewards=han_share:1`),
   and PPO so again with a KL coefficient of 0.2 that the adaptive controller can move within the run (horizon 16
   rollouts rather than 10000).

    flock /tmp/lorakit-heavy.lock python benchmarks/ppo_drift.py [--workdir DIR] [--grpo] [--han] [--no-base]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path


def lorakit(args: list[str], log: Path) -> float:
    t = time.time()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.time() - t


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def han(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum("\u4e00" <= c <= "\u9fff" for c in chars) / len(chars) if chars else 0.0


def rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def review_sft_data(work: Path) -> Path:
    """alpaca records (prompt -> review) from the RM's *training* pairs, chosen and rejected alike."""
    from lora_kit.data.pairs import read_pairs
    from lora_kit.data.records import split_eval

    train, _ = split_eval(read_pairs("zh_review_pairs"), 0.1, 42)  # rm_zh's split (eval_fraction 0.1, seed 42)
    out = work / "review_sft.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for group in train:
            for p in group:
                for answer in (p.chosen, p.rejected):
                    f.write(json.dumps({"instruction": p.prompt[-1]["content"], "input": "", "output": answer},
                                       ensure_ascii=False) + "\n")
    return out


def probe(rm: Path, classes: dict[str, list[tuple[list[dict], str]]]) -> dict[str, tuple[float, float, int]]:
    from lora_kit.models.load import load_tokenizer, resolve_model
    from lora_kit.recipe import load_config
    from lora_kit.stages import rm as rm_stage
    from lora_kit.templates import resolve
    from lora_kit.training.rewards import RewardModel

    cfg = load_config(rm_stage.Config, "rm_zh", ["dtype=fp32"])
    base = resolve_model(cfg.model)
    tok = load_tokenizer(base)
    model = RewardModel(str(rm), base, tok, resolve(cfg.template, tok), cfg)
    out = {}
    for name, items in classes.items():
        scores = []
        for i in range(0, len(items), 16):
            chunk = items[i:i + 16]
            scores += model(None, [t for _, t in chunk], None, [m for m, _ in chunk])
        out[name] = (*mean_se(scores), len(scores))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/lorakit-ppo-drift")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--grpo", action="store_true", help="also GRPO with the reward model from the SFT start")
    ap.add_argument("--han", action="store_true", help="also the SFT-start runs with the language-consistency reward "
                                                        "added (rewards=han_share:1)")
    ap.add_argument("--no-base", action="store_true", help="skip PPO from SmolLM2 itself (the slowest arm)")
    ap.add_argument("--ppo", nargs="*", default=["eval_fraction=0.2", "eval_samples=48"], metavar="key=value",
                    help="ppo overrides (default: 48 held-out prompts, so a rise of 3 standard errors can show)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rm, sft = work / "rm", work / "review-sft"
    if not (rm / "run.json").is_file():
        print(f"rm: {lorakit(['rm', '--recipe', 'rm_zh', f'output_dir={rm}', 'force=true'], work / 'rm.log'):.0f} s")
    print(f"rm: held-out pairwise accuracy {json.loads((rm / 'run.json').read_text())['held_out_accuracy']:.3f}")
    if not (sft / "run.json").is_file():
        secs = lorakit(["sft", "--recipe", "alpaca_zh", f"data={review_sft_data(work)}", "template=chatml",
                        "cutoff_len=128", f"max_steps={args.sft_steps}", "save_steps=1000", "learning_rate=5e-4",
                        "gradient_checkpointing=false", f"output_dir={sft}", "force=true"], work / "sft.log")
        print(f"review sft: {secs:.0f} s")

    runs = {"ppo from SmolLM2": (work / "ppo-base", ["ppo", "--recipe", "ppo_zh"]),
            "ppo from review SFT": (work / "ppo-sft", ["ppo", "--recipe", "ppo_zh", f"sft_adapter={sft}"])}
    if args.no_base:
        del runs["ppo from SmolLM2"]
    if args.grpo:
        runs["grpo from review SFT"] = (work / "grpo-sft", [
            "grpo", "--recipe", "grpo_zh", "data=zh_review_prompts", "eval_data=", "eval_fraction=0.2",
            "eval_samples=48", "template=chatml", "rewards=model:1", f"sft_adapter={sft}", "max_new_tokens=32",
            "temperature=1.0", "batch_size=2", "num_generations=4", "max_steps=15", "eval_steps=15",
            "save_steps=15"])
    if args.han:
        for name in [n for n in runs if "review SFT" in n]:
            out, cmd = runs[name]
            added = ["rewards=han_share:1"] if cmd[0] == "ppo" else ["rewards=model:1,han_share:1"]
            runs[f"{name} + han_share"] = (out.with_name(out.name + "-han"), cmd + added)
            if cmd[0] == "ppo":  # the adaptive KL controller at a horizon this short run can reach (default 10000)
                runs[f"{name} + han_share, KL 0.2 / horizon 16"] = (
                    out.with_name(out.name + "-han-kl"), cmd + added + ["init_kl_coef=0.2", "kl_horizon=16"])
    for name, (out, cmd) in runs.items():
        if not (out / "run.json").is_file():
            extra = args.ppo if cmd[0] == "ppo" else []
            secs = lorakit(cmd + [f"output_dir={out}", f"reward_adapter={rm}", "force=true", *extra],
                           work / f"{out.name}.log")
            print(f"{name}: {secs:.0f} s")

    # 1. blind spots, on the RM's held-out prompts
    from lora_kit.data.pairs import read_pairs
    from lora_kit.data.records import bundled_path, split_eval

    _, held = split_eval(read_pairs("zh_review_pairs"), 0.1, 42)
    pairs = [p for g in held for p in g]
    english = [json.loads(l)["text"] for l in bundled_path("en_heldout").read_text().splitlines() if l.strip()]
    rng = random.Random(0)
    shuffled = ["".join(rng.sample(p.chosen, len(p.chosen))) for p in pairs]
    classes = {"held-out positive reviews (chosen)": [(p.prompt, p.chosen) for p in pairs],
               "held-out negative reviews (rejected)": [(p.prompt, p.rejected) for p in pairs],
               "English prose (en_heldout)": [(pairs[i % len(pairs)].prompt, t[:120]) for i, t in enumerate(english)],
               "positive reviews, characters shuffled": [(p.prompt, s) for p, s in zip(pairs, shuffled)]}
    for name, (out, _) in runs.items():
        samples = out / "samples.jsonl"
        if samples.is_file():
            for when in ("before", "after"):
                got = [s for s in rows(samples) if s["when"] == when]
                classes[f"{name}: held-out samples {when}"] = [([{"role": "user", "content": s["prompt"]}],
                                                                 s["response"]) for s in got]
    print("\nreward model score by class (mean ± s.e., n) | Han share")
    probed = probe(rm, classes)
    for name, (m, se, n) in probed.items():
        print(f"{name} | {m:+.3f} ± {se:.3f} ({n}) | {statistics.fmean(han(t) for _, t in classes[name]):.2f}")

    # 3. the RL runs
    print("\nrun | held-out reward-model score before | after | rise in s.e. | KL after | Han share before -> after")
    for name, (out, _) in runs.items():
        m = rows(out / "metrics.jsonl")
        if name.startswith("ppo"):  # the reward model's score alone, also where the run added han_share to it
            ev = [r for r in m if "eval_reward" in r]
            b, bse, _ = probed[f"{name}: held-out samples before"]
            a, ase, _ = probed[f"{name}: held-out samples after"]
            got = rows(out / "samples.jsonl")
            hb = statistics.fmean(han(s["response"]) for s in got if s["when"] == "before")
            ha = statistics.fmean(han(s["response"]) for s in got if s["when"] == "after")
            print(f"{name} | {b:+.3f} ± {bse:.3f} | {a:+.3f} ± {ase:.3f} | {(a - b) / math.hypot(bse, ase):.1f} | "
                  f"{ev[-1].get('eval_kl', float('nan')):.2f} | {hb:.2f} -> {ha:.2f}")
        else:
            ev = [r for r in m if "eval_reward/model" in r]
            kl = [r["kl"] for r in m if "kl" in r]
            print(f"{name} | {ev[0]['eval_reward/model']:+.3f} | {ev[-1]['eval_reward/model']:+.3f} | (greedy, see "
                  f"metrics) | train KL {kl[-1] if kl else float('nan'):.3f} | {ev[0]['eval_reward/han_share']:.2f} -> "
                  f"{ev[-1]['eval_reward/han_share']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
