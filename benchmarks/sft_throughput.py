"""SFT throughput on a fixed workload: SmolLM2-135M, the first 512 records of ../shared/data/alpaca_zh_demo.json,
LoRA r=8 on all linear layers, cutoff 512, batch 4, 30 steps; packing on and off (interleaved, median of --repeats).

Prints non-padding tokens/s, wall time, peak RSS of the training process, final loss, padding share of the processed
tokens, and the achieved model FLOP/s against this machine's matmul peak in the run's dtype and in bf16 (the issue's
yardstick) (benchmarks/matmul_peak.py, or --peak/--peak-bf16).
FLOPs are counted per batch from the rows the trainer actually consumed, the way MFU is counted (work the model needs,
not work the kernels happen to do; padding and masked attention are not counted):
  frozen base linears   forward 2·N·T, backward only the activation gradient 2·N·T   (N = base linear weights)
  LoRA                  6·N_lora·T (forward, activation gradient, weight gradient)
  attention             12·d_attn·layers·P, P = causal pairs inside each record, Σ L(L+1)/2 (forward 4, backward 8)
  LM head               4·V·h·K at the K trained positions only (frozen head: forward + activation gradient)
`--profile N` instead runs N steps under torch.profiler and prints the top ops by self CPU time.
Run: python benchmarks/sft_throughput.py [--steps 30] [--repeats 1] [--peak GFLOPS] [--profile 3] [overrides...]
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


class FlopCounter:
    """Wraps the trainer's collator; tallies tokens, causal pairs, trained positions and padding of each batch."""

    def __init__(self, collator, model):
        import torch

        self.collator = collator
        self.tokens = self.pairs = self.trained = self.processed = 0
        cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.d_attn, self.layers = cfg.num_attention_heads * head_dim, cfg.num_hidden_layers
        self.vocab, self.hidden = cfg.vocab_size, cfg.hidden_size
        self.n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        # decoder linears (also 4-bit ones, whose packed storage hides the shape); embedding and head counted apart
        self.n_base = sum(m.in_features * m.out_features for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n)

    def __call__(self, features):
        batch = self.collator(features)
        self.processed += batch["input_ids"].numel()
        for f in features:
            n = len(f["input_ids"])
            self.tokens += n
            self.trained += sum(l != -100 for l in f["labels"][1:])
            pos = f.get("position_ids") or list(range(n))
            starts = [i for i, p in enumerate(pos) if p == 0] + [n]
            self.pairs += sum((e - s) * (e - s + 1) // 2 for s, e in zip(starts, starts[1:]))
        return batch

    def flops(self) -> float:
        return (4 * self.n_base * self.tokens + 6 * self.n_lora * self.tokens
                + 12 * self.d_attn * self.layers * self.pairs + 4 * self.vocab * self.hidden * self.trained)


def overrides(packing: bool, steps: int, out: Path, extra: list[str]) -> list[str]:
    return [f"data={DATA}", "max_samples=512", "cutoff_len=512", "batch_size=4", f"max_steps={steps}",
            f"save_steps={steps}", "logging_steps=5", "lora.r=8", "lora.target_modules=all-linear",
            "learning_rate=1e-4", "seed=42", f"packing={str(packing).lower()}", f"output_dir={out}", *extra]


def one_run(packing: bool, steps: int, extra: list[str], profile: int = 0) -> dict:
    """In this (fresh) process: the same setup `lorakit sft` runs, with the collator counted."""
    import torch
    from transformers import TrainerCallback

    from lora_kit.recipe import load_config
    from lora_kit.stages import sft

    out = Path(tempfile.mkdtemp(prefix="sftbench-")) / "run"
    start = time.time()
    job = sft.setup(load_config(sft.Config, "alpaca_zh", overrides(packing, steps, out, extra)))
    counter = FlopCounter(job.trainer.data_collator, job.model)
    job.trainer.data_collator = counter
    if profile:
        class Profile(TrainerCallback):  # steps 2..profile+1: the first step pays one-off allocations
            prof = None

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == 1:
                    self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    self.prof.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if self.prof is not None and state.global_step == 1 + profile:
                    self.prof.__exit__(None, None, None)
                    print(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
                    self.prof = None

        job.trainer.add_callback(Profile())
    job.trainer.train()
    wall = time.time() - start
    final = job.trainer.state.log_history[-1]
    losses = [r["loss"] for r in job.trainer.state.log_history if "loss" in r]
    return {"packing": packing, "tokens_per_s": counter.tokens / final["train_runtime"], "tokens": counter.tokens,
            "train_s": final["train_runtime"], "wall_s": wall, "final_loss": losses[-1] if losses else float("nan"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "padding": 1 - counter.tokens / counter.processed, "gflops": counter.flops() / final["train_runtime"] / 1e9,
            "dtype": "bf16" if job.trainer.args.bf16 else "fp32", "flops_per_token": counter.flops() / counter.tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--peak", type=float, help="fp32 matmul peak GFLOP/s (default: measure it now)")
    p.add_argument("--peak-bf16", type=float, help="bf16 matmul peak GFLOP/s (default: measure it now)")
    p.add_argument("--modes", default="packed,padded", help="comma-separated: packed, padded")
    p.add_argument("--profile", type=int, default=0, help="profile N steps of one packed run instead")
    p.add_argument("--child", choices=["packed", "padded"], help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="extra recipe overrides, e.g. dtype=fp32 quantization=4bit")
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child == "packed", args.steps, args.extra, args.profile)))
        return
    if not DATA.is_file():
        sys.exit(f"{DATA} not found (the benchmark reads ../shared/data)")
    if args.profile:
        subprocess.run([sys.executable, __file__, "--child", "packed", "--steps", str(args.profile + 2),
                        "--profile", str(args.profile), *args.extra], check=True)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from matmul_peak import gflops

    peaks = {"fp32": args.peak or gflops(torch.float32, 20), "bf16": args.peak_bf16 or gflops(torch.bfloat16, 20)}
    modes = args.modes.split(",")
    results = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:  # interleaved: identical runs vary by ~25% on these machines
            # a fresh process per run, so its peak RSS is its own
            r = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps), *args.extra],
                               check=True, capture_output=True, text=True)
            results[mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"workload: SmolLM2-135M, 512 alpaca_zh records, LoRA r=8 all-linear, cutoff 512, batch 4, "
          f"{args.steps} steps {' '.join(args.extra)}; "
          f"matmul peak fp32 {peaks['fp32']:.1f} / bf16 {peaks['bf16']:.1f} GFLOP/s")
    print(f"{'mode':<8} {'tokens/s':>9} {'tokens':>8} {'train s':>8} {'wall s':>7} {'peak RSS MB':>12} "
          f"{'final loss':>10} {'padding':>8} {'GFLOP/s':>8} {'% peak':>7} {'% bf16 peak':>12}")
    med = {}
    for mode, runs in results.items():
        m = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "tokens", "train_s", "wall_s",
                                                                "peak_rss_mb", "final_loss", "padding", "gflops")}
        m["pct"] = 100 * m["gflops"] / peaks[runs[0]["dtype"]]
        med[mode] = m
        print(f"{mode:<8} {m['tokens_per_s']:>9.1f} {m['tokens']:>8.0f} {m['train_s']:>8.1f} {m['wall_s']:>7.1f} "
              f"{m['peak_rss_mb']:>12.0f} {m['final_loss']:>10.4f} {m['padding']:>8.2%} {m['gflops']:>8.1f} "
              f"{m['pct']:>6.1f}% {100 * m['gflops'] / peaks['bf16']:>11.1f}% ({runs[0]['dtype']} run, "
              f"{runs[0]['flops_per_token'] / 1e6:.0f} MFLOP/token)")
    if len(med) == 2:
        print(f"packed/padded tokens/s ratio: {med['packed']['tokens_per_s'] / med['padded']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
