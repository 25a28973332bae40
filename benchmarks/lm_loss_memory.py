"""The LM-head loss, plain vs chunked vs fused (`lora_kit.lmloss`): peak RSS growth and time of a forward+backward,
batch 4 x block_size random tokens, every position trained, on SmolLM2-135M with LoRA r8 all-linear and
- `--head rows` (default): its vocabulary extended to 69,152 rows (as `lorakit extend-vocab` leaves it) and the 20,000
  new rows trainable (pretrain phase 2); the head trains rows, so lmloss takes its plain chunked path;
- `--head frozen`: the vocabulary as shipped (49,152) and the head frozen (LoRA SFT), where lmloss takes its fused path;
  mode `chunked` there forces the plain chunked path for comparison.
Modes: plain = the model's own loss; chunked / fused = lmloss's two paths.
Each case runs in a fresh process (glibc returns freed blocks >= 64 KiB, so freed tensors leave the RSS).
Run: python benchmarks/lm_loss_memory.py [--blocks 256,512] [--steps 3] [--head frozen --modes plain,chunked,fused]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

ROWS = 69152


def rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(mode: str, block: int, steps: int, head: str) -> dict:
    import torch

    from lora_kit.models.load import load_model, resolve_model
    from lora_kit.models.lora import attach_lora
    from lora_kit.recipe import LoraArgs
    from lora_kit.training import loss as lmloss
    from lora_kit.training.loss import PositionLossTrainer

    torch.manual_seed(0)
    model = load_model(resolve_model("smollm2-135m"), dtype="fp32")
    old = rows = model.get_input_embeddings().weight.shape[0]
    if head == "rows":
        rows = ROWS
        model.resize_token_embeddings(ROWS, mean_resizing=False)
    model.config.use_cache = False
    model = attach_lora(model, LoraArgs(r=8, alpha=32, dropout=0.0, target_modules="all-linear"),
                        trainable_token_indices=list(range(old, ROWS)) if head == "rows" else None)
    fused = lmloss._frozen_plain(model.get_output_embeddings())
    if mode == "fused" and not fused:
        raise SystemExit("mode fused needs --head frozen")
    if mode == "chunked":
        lmloss._frozen_plain = lambda head: False
    ids = torch.randint(0, rows, (4, block))
    inputs = {"input_ids": ids, "labels": ids.clone()}
    fake = SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=False))

    def step():
        loss = model(**inputs).loss if mode == "plain" else PositionLossTrainer.compute_loss(fake, model, dict(inputs))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    loss = step()  # warm-up: one-off allocations
    before = rss_mb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"mode": mode, "block": block, "loss": loss, "step_s": statistics.median(times),
            "peak_growth_mb": rss_mb("VmHWM") - before, "peak_rss_mb": rss_mb("VmHWM")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="256,512")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--modes", default="plain,chunked")
    p.add_argument("--head", choices=("rows", "frozen"), default="rows")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps, args.head)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"{'block':>5} {'mode':<8} {'loss':>8} {'step s':>7} {'peak growth MiB':>16} {'peak RSS MiB':>13}")
    for block in map(int, args.blocks.split(",")):
        for _ in range(args.repeats):
            for mode in args.modes.split(","):  # interleaved
                r = subprocess.run([sys.executable, __file__, "--child", mode, str(block), "--steps", str(args.steps),
                                    "--head", args.head],
                                   check=True, capture_output=True, text=True, env=env)
                d = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{block:>5} {mode:<8} {d['loss']:>8.4f} {d['step_s']:>7.2f} {d['peak_growth_mb']:>16.0f} "
                      f"{d['peak_rss_mb']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
