"""SFT throughput on a fixed workload: SmolLM2-135M, the first 512 records of ../shared/data/alpaca_zh_demo.json, LoRA r=8
on all linear layers, cutoff 512, batch 4, 30 steps; packing on and off (interleaved, median of --repeats).

Prints non-padding tokens/s (the trainer's non-padding count over the training runtime), wall time, peak RSS of the
training process and final loss. Run: python benchmarks/sft_throughput.py [--steps 30] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_zh_demo.json"


def one_run(packing: bool, steps: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="sftbench-")) / "run"
    cmd = [sys.executable, "-m", "lora_kit.cli", "sft", "--recipe", "alpaca_zh", f"data={DATA}", "max_samples=512",
           "cutoff_len=512", "batch_size=4", f"max_steps={steps}", f"save_steps={steps}", "logging_steps=5",
           "lora.r=8", "lora.target_modules=all-linear", "learning_rate=1e-4", "seed=42", f"packing={str(packing).lower()}",
           f"output_dir={out}", *extra]
    start = time.time()
    # Each run is a fresh child; RUSAGE_CHILDREN's maxrss is the largest child so far, so runs go in separate
    # processes spawned from a fresh python each (see main).
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - start
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"packing": packing, "tokens_per_s": final["num_input_tokens_seen"] / final["train_runtime"],
            "tokens": final["num_input_tokens_seen"], "train_s": final["train_runtime"], "wall_s": wall,
            "final_loss": losses[-1], "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--child", choices=["packed", "padded"], help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="extra recipe overrides, e.g. dtype=fp32 quantization=4bit")
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child == "packed", args.steps, args.extra)))
        return
    if not DATA.is_file():
        sys.exit(f"{DATA} not found (the benchmark reads ../shared/data)")
    results = {"packed": [], "padded": []}
    for _ in range(args.repeats):
        for mode in ("packed", "padded"):  # interleaved: identical runs vary by ~25% on these machines
            r = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps), *args.extra],
                               check=True, capture_output=True, text=True)
            results[mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"workload: SmolLM2-135M, 512 alpaca_zh records, LoRA r=8 all-linear, cutoff 512, batch 4, {args.steps} steps "
          f"{' '.join(args.extra)}")
    print(f"{'mode':<8} {'tokens/s':>9} {'tokens':>8} {'train s':>8} {'wall s':>7} {'peak RSS MB':>12} {'final loss':>10}")
    med = {}
    for mode, runs in results.items():
        m = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "tokens", "train_s", "wall_s",
                                                                "peak_rss_mb", "final_loss")}
        med[mode] = m
        print(f"{mode:<8} {m['tokens_per_s']:>9.1f} {m['tokens']:>8.0f} {m['train_s']:>8.1f} {m['wall_s']:>7.1f} "
              f"{m['peak_rss_mb']:>12.0f} {m['final_loss']:>10.4f}")
    print(f"packed/padded tokens/s ratio: {med['packed']['tokens_per_s'] / med['padded']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
