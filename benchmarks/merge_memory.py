"""Benchmark `lorakit merge` on a synthetic sharded LLaMA (~1.5 GB bf16 in 4 shards): wall time and peak RSS.

    flock /tmp/lorakit-heavy.lock python benchmarks/merge_memory.py [--layers 14] [--keep DIR]

The model (random weights) and a rank-16 all-linear adapter are built in a temporary directory; the merge runs in a
child process (the real CLI) whose peak resident memory is read from the kernel (wait4 rusage).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_kit.export.common import Lora, write_adapter, write_safetensors_stream

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
           "self_attn.v_proj": (HIDDEN // HEADS * KV_HEADS, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def build_model(path: Path, layers: int, shards: int = 4) -> int:
    """Write config, a small tokenizer and random bf16 weights in `shards` files; return the weights' bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    path.mkdir(parents=True)
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False,
                dtype="bfloat16").save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["今天天气很好，我们去公园散步。The quick brown fox jumps over the lazy dog."] * 50,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    shapes = {"model.embed_tokens.weight": [VOCAB, HIDDEN]}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{n}.weight": list(s) for n, s in LINEARS.items()})
        shapes.update({f"model.layers.{i}.input_layernorm.weight": [HIDDEN],
                       f"model.layers.{i}.post_attention_layernorm.weight": [HIDDEN]})
    shapes.update({"model.norm.weight": [HIDDEN], "lm_head.weight": [VOCAB, HIDDEN]})
    keys = list(shapes)
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    groups, acc = [[]], 0
    for k in keys:
        if acc > total / shards * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(k)
        acc += 2 * torch.Size(shapes[k]).numel()
    g = torch.Generator().manual_seed(0)

    def make(key):
        s = shapes[key]
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * (1 / s[-1] ** 0.5)
        return t.to(torch.bfloat16)

    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors_stream(path / name, [(k, shapes[k], torch.bfloat16) for k in group], make)
        weight_map.update({k: name for k in group})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def build_adapter(path: Path, base: Path, layers: int, r: int = 16) -> None:
    g = torch.Generator().manual_seed(1)
    lora = {f"model.layers.{i}.{n}.weight": Lora(torch.randn(r, s[1], generator=g) / s[1] ** 0.5,
                                                 torch.randn(s[0], r, generator=g) * 0.01, 1.0)
            for i in range(layers) for n, s in LINEARS.items()}
    path.mkdir(parents=True)
    write_adapter(path, lora, r, base_model=str(base))


def run_merge(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the child, its stdout)."""
    start = time.perf_counter()
    out = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", *argv], stdout=out, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    out.seek(0)
    text = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"merge failed ({proc.returncode}):\n{text}")
    return wall, usage.ru_maxrss * 1024, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=14, help="decoder layers (14 -> ~1.52 GB)")
    ap.add_argument("--keep", help="build in this directory and keep it")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lorakit-merge-bench-"))
    base, adapter, out = root / "base", root / "adapter", root / "merged"
    t0 = time.perf_counter()
    size = build_model(base, args.layers)
    build_adapter(adapter, base, args.layers)
    print(f"built {size / 1e9:.2f} GB model ({args.layers} layers, 4 shards) + r16 adapter in "
          f"{time.perf_counter() - t0:.0f}s under {root}")
    wall, rss, text = run_merge(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out),
                                 "--shard-size", "500MB"])
    diff = re.search(r"= ([0-9.e+-]+) \(tolerance", text)
    result = {"model_bytes": size, "merge_seconds": round(wall, 1), "peak_rss_bytes": rss,
              "peak_rss_over_size": round(rss / size, 3), "max_logit_diff": float(diff.group(1)) if diff else None}
    print(json.dumps(result, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
