"""QLoRA vs bf16 LoRA peak RSS on a ~1.1B-parameter LLaMA (TinyLlama-1.1B's shape, random bf16 weights).

Builds the model once as safetensors (vocab 32000, hidden 2048, 22 layers, GQA 32/4 heads, intermediate 5632) with
the LLaMA-2 tokenizer from ../shared/data, then runs `lorakit sft` for a few steps of short packed rows, each case in a
fresh process whose peak RSS is read with RUSAGE_CHILDREN by a fresh parent. Cases: bf16 LoRA (dtype=bf16),
QLoRA NF4 with bf16 compute (quantization=4bit dtype=bf16) and QLoRA with this CPU's auto dtype (fp32 compute).
Run: python benchmarks/qlora_memory.py [--work DIR] [--steps 2] [--layers 22]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = {"lora-bf16": ["dtype=bf16"], "qlora-bf16": ["quantization=4bit", "dtype=bf16"],
         "qlora-auto": ["quantization=4bit", "dtype=auto"]}


def build(path: Path, layers: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok_dir = path / "_tok"
    tok_dir.mkdir()
    shutil.copy(SHARED / "llama2_tokenizer.model", tok_dir / "tokenizer.model")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    shutil.rmtree(tok_dir)
    return sum(p.numel() for p in model.parameters())


def child(case: str, model: Path, work: Path, steps: int) -> dict:
    out = work / f"out-{case}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lora_kit.cli", "sft", "--recipe", "alpaca_zh", f"model={model}", "data=zh_sft_mix",
           "template=alpaca", "max_samples=64", "cutoff_len=128", "batch_size=2", f"max_steps={steps}",
           f"save_steps={steps}", "logging_steps=1", f"output_dir={out}", *CASES[case]]
    start = time.time()
    peaks = {"RssAnon": 0, "RssFile": 0}  # sampled: which kind of page holds the peak (ru_maxrss counts both)
    with open(work / f"{case}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) / 1024)
            except OSError:
                pass
            time.sleep(0.1)
    if proc.returncode:
        sys.exit(f"{case} failed:\n{(work / f'{case}.log').read_text()[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"case": case, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "wall_s": time.time() - start, "loss": [r["loss"] for r in rows if "loss" in r],
            "anon_peak_mb": peaks["RssAnon"], "file_peak_mb": peaks["RssFile"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/qlora-memory")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    work, model = Path(args.work), Path(args.work) / "model"
    if args.child:
        print(json.dumps(child(args.child, model, work, args.steps)))
        return
    if not (model / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        n = build(model, args.layers)
        print(f"built {model}: {n / 1e9:.2f}B parameters", flush=True)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    results = {}
    for case in args.cases.split(","):  # each case in a fresh parent: RUSAGE_CHILDREN keeps the largest child so far
        r = subprocess.run([sys.executable, __file__, "--child", case, "--work", str(work), "--steps", str(args.steps)],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        results[case] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{case:<11} peak RSS {results[case]['peak_rss_mb']:>7.0f} MiB  wall {results[case]['wall_s']:>5.0f} s  "
              f"(sampled peaks: anonymous {results[case]['anon_peak_mb']:.0f}, "
              f"file-backed {results[case]['file_peak_mb']:.0f} MiB)  "
              f"loss {results[case]['loss']}", flush=True)
    base = results.get("lora-bf16")
    print(f"model: {size / 2**30:.2f} GiB bf16 safetensors")
    for case, r in results.items():
        if base and case != "lora-bf16":
            print(f"{case} / lora-bf16 peak RSS: {r['peak_rss_mb'] / base['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
