"""GGUF as users run it (issue 19 §3): lorakit's GGUF files in llama.cpp itself (llama-cpp-python) vs transformers.

For each model directory (default: SmolLM2-135M-Instruct and its `lorakit extend-vocab` extension; add a
SentencePiece model with --models), the file of every type in --types is written by `export_gguf` (the code
`lorakit merge --format gguf` runs, its own checks included), then measured:

- tokenization: llama.cpp's ids (no BOS, special text kept as text) against the HF tokenizer's on every line of the
  Chinese sample (the bundled held-out task inputs and the alpaca_zh demo instructions) and the English one
  (data/en_heldout.jsonl, wiki_demo lines cut to 2,000 characters): the share of identical lines;
- greedy generation from the f16 file against transformers (fp32) on --prompts chat prompts of held-out reviews, the
  same prompt ids fed to both: the share of identical answers (--new-tokens tokens);
- bits per character of held-out Chinese text (the bundled held-out task inputs, each scored after an EOS as
  `lorakit eval` scores it) in llama.cpp for each type, and its ratio to f16.

    python benchmarks/gguf_llama_cpp.py --work /tmp/ggufbench [--models smollm2-135m,/tmp/ext2k] [--types ...]

Prints a table per model and writes WORK/result.json. Needs `pip install 'lorakit[gguf]'`.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.data.records import read_records
from lora_kit.evaluate.suite import en_texts, zh_texts
from lora_kit.export import llamacpp
from lora_kit.export.gguf import export_gguf
from lora_kit.models.load import resolve_model
from lora_kit.templates import prompt_ids, resolve

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def samples() -> dict[str, list[str]]:
    zh = zh_texts() + [r.data["instruction"] for r in read_records(str(SHARED / "alpaca_zh_demo.json"))]
    wiki = [l.strip()[:2000] for l in (SHARED / "wiki_demo.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
    return {"zh": [t for t in zh if t.strip()], "en": en_texts() + wiki}


def bits_per_char(llm, tok, texts: list[str]) -> float:
    nats, chars = 0.0, 0
    for text in texts:
        ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        logits = llamacpp.logits(llm, ids).double()
        nats -= float(logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).sum())
        chars += len(text)
    return nats / math.log(2) / chars


def greedy_llama_cpp(llm, ids: list[int], n: int, eos: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(torch.from_numpy(llm.scores[llm.n_tokens - 1].copy()).argmax())
        out.append(nxt)
        if nxt == eos:
            break
        llm.eval([nxt])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--models", default="smollm2-135m,/tmp/ext2k")
    ap.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = samples()
    zh_eval = zh_texts()
    reviews = [r.data["input"] for r in read_records("zh_sentiment_test")][:args.prompts]
    result = {}
    for model in args.models.split(","):
        src = Path(resolve_model(model))
        tok = AutoTokenizer.from_pretrained(src)
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        template = resolve("auto", tok)
        ask = "判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。\n"
        prompts = [prompt_ids(tok, template, [{"role": "user", "content": ask + r}]) for r in reviews]
        row = {"types": {}}
        for kind in args.types.split(","):
            d = work / f"{src.name}-{kind}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            t0 = time.time()
            path, checks = export_gguf(src, d, kind)
            entry = {"export_s": round(time.time() - t0, 1), "bytes": path.stat().st_size,
                     "check": checks.get("llama_cpp")}
            llm = llamacpp.load(path, n_ctx=4096)
            if kind == "f16":
                same = {k: sum(llamacpp.tokenize(llm, t) == tok(t, add_special_tokens=False)["input_ids"] for t in v)
                        for k, v in text.items()}
                row["tokenization"] = {k: f"{same[k]}/{len(v)}" for k, v in text.items()}
                answers, ties = [], []
                for ids in prompts:
                    with torch.no_grad():
                        out = hf.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                                          output_logits=True, return_dict_in_generate=True)
                    want = out.sequences[0, len(ids):].tolist()
                    got = greedy_llama_cpp(llm, ids, args.new_tokens, tok.eos_token_id)
                    answers.append(want == got)
                    if want != got:  # where they part: transformers' margin between its token and llama.cpp's
                        i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                        step = out.logits[i][0] if i < len(out.logits) and i < len(got) else None
                        margin = None if step is None else round(float(step[want[i]] - step[got[i]]), 4)
                        ties.append({"token": i, "margin": margin})
                row["greedy_equal"] = f"{sum(answers)}/{len(answers)}"
                row["greedy_divergences"] = ties
            entry["zh_bpc"] = round(bits_per_char(llm, tok, zh_eval), 4)
            llm.close()
            path.unlink()
            row["types"][kind] = entry
            print(model, kind, entry, flush=True)
        f16 = row["types"].get("f16", {}).get("zh_bpc")
        for entry in row["types"].values():
            entry["bpc_vs_f16"] = round(entry["zh_bpc"] / f16, 4) if f16 else None
        result[model] = row
        print(f"\n{model}: tokenization identical {row.get('tokenization')}; greedy answers equal to transformers "
              f"{row.get('greedy_equal')} (where not: {row.get('greedy_divergences')})")
        print("| type | MB | zh bits/char | vs f16 | logit corr | top-1 |")
        print("|---|---|---|---|---|---|")
        for kind, e in row["types"].items():
            c = e["check"] or {}
            print(f"| {kind} | {e['bytes'] / 1e6:.0f} | {e['zh_bpc']:.4f} | {e['bpc_vs_f16']:.4f} | "
                  f"{c.get('logit_correlation')} | {c.get('top1_agreement')} |")
    (work / "result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
