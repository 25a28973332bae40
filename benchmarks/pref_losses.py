"""Preference losses at the same steps: `lorakit dpo --recipe {loss}_zh` (DPO, KTO, ORPO, SimPO) on the bundled review
pairs, then held-out pairwise accuracy on the same 100 held-out pairs (whole records never trained on): each loss's
own implicit reward (log-ratio to the reference for DPO/KTO, mean log-probability for ORPO/SimPO) and both measures
for every run, with the binomial standard error.

    flock /tmp/lorakit-heavy.lock python benchmarks/pref_losses.py [--losses dpo,kto,orpo,simpo] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--losses", default="dpo,kto,orpo,simpo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workdir", default="/tmp/lorakit-pref-losses")
    ap.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = ap.parse_args()
    lorakit = [sys.executable, "-m", "lora_kit.cli"]
    print("loss | own implicit-reward accuracy | s.e. | log-ratio accuracy | mean-logp accuracy | seconds")
    for loss in args.losses.split(","):
        out = Path(args.workdir) / f"{loss}-seed{args.seed}"
        t0 = time.time()
        subprocess.run(lorakit + ["dpo", "--recipe", f"{loss}_zh", f"output_dir={out}", f"max_steps={args.steps}",
                                  f"save_steps={args.steps}", f"seed={args.seed}", "force=true", *args.extra],
                       check=True, stdout=subprocess.DEVNULL)
        run = json.loads((out / "run.json").read_text())
        p, n = run["held_out_pref_accuracy"], run["held_out_pairs"]
        print(f"{loss} | {p:.3f} | {math.sqrt(p * (1 - p) / n):.3f} | {run['held_out_ratio_accuracy']:.3f} | "
              f"{run['held_out_mean_logp_accuracy']:.3f} | {time.time() - t0:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
