"""The demo pipeline's figures for BENCHMARKS.md: runs `lorakit pipeline --recipe zh_pipeline` (optionally with
`ablate=extend-vocab`), times it, checks the issue-17 quality targets against the base column, and with --curve
scores held-out sentiment accuracy of the SFT checkpoints the run kept (accuracy against steps).

    python benchmarks/pipeline_demo.py --out runs/demo [--ablate] [--curve] [-- key=value ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lora_kit.evaluate.tasks import accuracy
from lora_kit.models.builder import load_for_inference
from lora_kit.templates import resolve

TARGETS = [  # metric, test against the base column, description
    ("sentiment_accuracy", lambda v, b: v >= 0.85, "held-out sentiment accuracy >= 0.85"),
    ("zh_bits_per_char", lambda v, b: v <= 0.9 * b, "Chinese bits/char >= 10% below the base's"),
    ("en_bits_per_char", lambda v, b: v <= 1.05 * b, "English bits/char <= 5% above the base's"),
    ("zh_tokens_per_char", lambda v, b: v < b, "fewer tokens per Chinese character than the base"),
    ("segment_f1", lambda v, b: v > b, "segmentation F1 above the base's"),
]


def check(report: dict, final: str) -> None:
    metrics = report["metrics"]
    for key, test, text in TARGETS:
        if key not in metrics or final not in metrics[key]:
            print(f"  {text}: not measured")
            continue
        v, b = metrics[key][final], metrics[key].get("base")
        print(f"  {'MET ' if test(v, b) else 'MISS'} {text}: {v:.4f} (base {b:.4f})")


def curve(out: Path, limit: int) -> None:
    sft = next(p for p in sorted(out.glob("*-sft")) if p.is_dir())
    base = json.loads((sft / "run.json").read_text())["base_model"]
    points = sorted(sft.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) + [sft]
    for p in points:
        model, tok, template = load_for_inference(base, str(p))
        acc = accuracy(model, tok, resolve(template, tok), "sentiment", limit=limit)["accuracy"]
        step = p.name.split("-")[1] if p != sft else "final"
        print(f"  sft step {step}: held-out sentiment accuracy {acc:.3f} ({limit or 'all'} records)", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ablate", action="store_true", help="also the branch without extend-vocab")
    p.add_argument("--curve", action="store_true", help="sentiment accuracy of the kept SFT checkpoints")
    p.add_argument("--curve-limit", type=int, default=100)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = Path(args.out)
    cmd = [sys.executable, "-m", "lora_kit.cli", "pipeline", "--recipe", "zh_pipeline", f"output_dir={out}",
           *(["ablate=extend-vocab"] if args.ablate else []), *args.overrides]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"pipeline wall time: {time.time() - t0:.0f} s")
    for d in sorted(out.glob("[0-9]*-*")):
        state = json.loads((d / "stage.json").read_text()) if (d / "stage.json").is_file() else {}
        ev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
        print(f"  {d.name:<16} stage {state.get('seconds', 0):>6.0f} s  peak {state.get('peak_rss_mb', 0):>6.0f} MiB"
              f"  eval {ev.get('seconds', 0):>5.0f} s")
    evals = [d for d in sorted(out.glob("[1-9]*-*")) if (d / "eval.json").is_file()]
    report = {"metrics": {}}
    for d in [out / "0-base", *evals]:
        for k, v in json.loads((d / "eval.json").read_text())["result"]["metrics"].items():
            report["metrics"].setdefault(k, {}).update({("base" if d.name == "0-base" else d.name): x
                                                        for x in v.values()})
    print(f"targets, final model {evals[-1].name}:")
    check(report, evals[-1].name)
    if args.curve:
        curve(out, args.curve_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
