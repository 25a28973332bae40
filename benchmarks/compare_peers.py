"""lorakit vs LLaMA-Factory vs TRL+PEFT by hand on one LoRA SFT workload, on this machine.

Workload: SmolLM2-135M(-Instruct), the first 512 records of ../shared/data/alpaca_zh_demo.json, Alpaca prompt, LoRA r=8
on all linear layers, cutoff 512, batch 4, 30 steps, learning rate 1e-4, seed 42; plain (fp32/bf16 weights) and QLoRA
(NF4). Two modes: *defaults* (each tool's minimal config for this workload, its other settings left as shipped) and
*best* (each tool's fastest settings that this machine accepts). Every run is a fresh process under
benchmarks/peers/measure.py, which counts non-padding tokens of the batches each trainer consumed the same way for all
tools. Runs are interleaved; medians of --repeats and lorakit's ratios to each peer are printed.

    python benchmarks/compare_peers.py --setup            # installs the peers once (benchmarks/setup_peers.sh)
    python benchmarks/compare_peers.py --steps 3          # smoke run
Each run takes the shared lock (--lock) on its own, so other short jobs interleave.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "alpaca_zh_demo.json"
BENCH_HOME = Path(os.environ.get("LORAKIT_BENCH_HOME", Path.home() / ".cache" / "lorakit-bench"))
TOOLS = ("lorakit", "llamafactory", "trl")
PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "llamafactory", "lorakit")


def python_of(tool: str) -> str:
    return sys.executable if tool == "lorakit" else str(BENCH_HOME / tool / "bin" / "python")


# ---------------------------------------------------------------------------------------------------- commands
def lorakit_cmd(w, mode: str, quant: str, out: Path) -> list[str]:
    # template=alpaca: the same prompt text as the peers (the recipe's `auto` would use SmolLM2's ChatML template)
    cmd = ["-m", "lora_kit.cli", "sft", "--recipe", "alpaca_zh", f"model={w.model}", f"data={DATA}", "max_samples=512",
           "cutoff_len=512", "batch_size=4", f"max_steps={w.steps}", "lora.r=8", "lora.target_modules=all-linear",
           f"learning_rate={w.lr}", f"seed={w.seed}", "template=alpaca", f"quantization={quant}", f"output_dir={out}"]
    if mode == "best":
        # packing (the recipe's default) and LoRA dropout 0 are already the fastest; the dtype is the one `auto` would
        # pick, fixed for every tool (w.bf16); the recipe's gradient checkpointing (a memory choice, -25% tokens/s)
        # goes, as in the peers' best mode, and so does the mid-run checkpoint the recipe writes (save_steps 15)
        cmd += ["lora.dropout=0", "gradient_checkpointing=false", f"save_steps={w.steps}",
                f"dtype={'auto' if w.cuda else 'bf16' if w.bf16 else 'fp32'}"]  # auto: bf16, or fp16 on older GPUs
    return cmd


def llamafactory_cmd(w, mode: str, quant: str, out: Path) -> list[str]:
    cfg = {"model_name_or_path": w.model, "stage": "sft", "do_train": True, "finetuning_type": "lora",
           "lora_rank": 8, "lora_target": "all", "dataset": "alpaca_zh_512", "dataset_dir": str(w.dir),
           "template": "alpaca", "cutoff_len": 512, "overwrite_cache": True, "output_dir": str(out),
           "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": w.lr,
           "max_steps": w.steps, "logging_steps": 5, "seed": w.seed, "report_to": "none"}
    if w.cuda:
        cfg["bf16"] = True  # the setting LLaMA-Factory's example configs use on GPUs
    else:  # LLaMA-Factory's CPU path: use_cpu; bf16 autocast in best mode where this CPU runs it faster (w.bf16)
        cfg.update(use_cpu=True, bf16=mode == "best" and w.bf16, fp16=False)
    if quant == "4bit":
        cfg.update(quantization_bit=4, quantization_method="bnb")  # NF4 + double quantization by default
    if mode == "best":
        # neat_packing: packed rows without cross-record attention, like lorakit's packing; gradient checkpointing
        # (on by default) recomputes the forward
        cfg.update(packing=True, neat_packing=True, disable_gradient_checkpointing=True, save_steps=w.steps)
    path = w.dir / f"llamafactory-{mode}-{quant}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # `llamafactory-cli train CFG` on one device runs run_exp() in process; the module form lets measure.py wrap it
    return ["-m", "llamafactory.cli", "train", str(path)]


def trl_cmd(w, mode: str, quant: str, out: Path) -> list[str]:
    cmd = [str(HERE / "peers" / "trl_sft.py"), "--model", w.model, "--data", str(DATA), "--output", str(out),
           "--steps", str(w.steps), "--lr", str(w.lr), "--seed", str(w.seed), "--quant", quant]
    if mode == "best":
        cmd += ["--packing", "--no-gradient-checkpointing", "--dtype", "bf16" if w.bf16 else "fp32"]
    return cmd


COMMANDS = {"lorakit": lorakit_cmd, "llamafactory": llamafactory_cmd, "trl": trl_cmd}


# ---------------------------------------------------------------------------------------------------- running
def prepare(work: Path) -> None:
    """The first 512 records as their own file, registered for LLaMA-Factory in a dataset_info.json."""
    records = json.loads(DATA.read_text(encoding="utf-8"))[:512]
    (work / "alpaca_zh_512.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    info = {"alpaca_zh_512": {"file_name": "alpaca_zh_512.json",
                              "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}
    (work / "dataset_info.json").write_text(json.dumps(info, indent=1))


def one_run(w, tool: str, mode: str, quant: str, index: int) -> dict:
    name = f"{tool}-{mode}-{quant}-{index}"
    out, result, log = w.dir / "runs" / name, w.dir / f"{name}.json", w.dir / f"{name}.log"
    cmd = [python_of(tool), str(HERE / "peers" / "measure.py"), "--result", str(result),
           *(["--profile", str(w.profile)] if w.profile else []), "--", *COMMANDS[tool](w, mode, quant, out)]
    if w.lock:
        cmd = ["flock", w.lock, *cmd]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_DISABLED": "true"}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=w.dir).returncode
    r = json.loads(result.read_text()) if result.is_file() else {}
    if rc != 0 or not r.get("tokens") or not r.get("train_s"):
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-25:])
        print(f"    FAILED (exit {rc}, {r.get('tokens', 0)} tokens seen); log {log}:\n{tail}", flush=True)
        return None  # the other runs go on; the table leaves this one out
    tail = r["losses"][-5:]
    r.update(tool=tool, mode=mode, quant=quant, tokens_per_s=r["tokens"] / r["train_s"],
             final_loss=sum(tail) / len(tail), fill=r["tokens"] / r["padded_positions"])
    print(f"    {r['tokens_per_s']:.1f} tokens/s, {r['tokens']} tokens in {r['train_s']:.1f} s, "
          f"wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, loss {r['final_loss']:.4f}", flush=True)
    return r


def versions(tool: str) -> str:
    code = ("import importlib.metadata as m\nfor p in %r:\n    try: print(p + '==' + m.version(p), end=' ')\n"
            "    except m.PackageNotFoundError: pass" % (PACKAGES,))
    r = subprocess.run([python_of(tool), "-c", code], capture_output=True, text=True)
    text = r.stdout.strip() or r.stderr.strip().splitlines()[-1]
    if tool == "lorakit":  # the tree measured: commit, and whether it had uncommitted changes
        git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
        dirty = ", uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
        text += f" (git {git('rev-parse', '--short', 'HEAD')}{dirty})"
    return text


def report(w, results: list[dict]) -> None:
    mem = "CUDA peak MB" if w.cuda else "peak RSS MB"
    print(f"\nworkload: SmolLM2-135M, first 512 records of alpaca_zh_demo.json, Alpaca prompt, LoRA r=8 all-linear, "
          f"cutoff 512, batch 4, {w.steps} steps, lr {w.lr}, seed {w.seed}, {'CUDA' if w.cuda else 'CPU'}; medians of "
          f"{w.repeats} run(s); tokens/s = non-padding tokens consumed / train() time; loss = mean of the last 5 steps")
    for tool in w.tools:
        print(f"  {tool}: {versions(tool)}")
    for quant in w.quants:
        for mode in w.modes:
            print(f"\n{quant if quant != 'none' else 'LoRA'} ({'QLoRA NF4' if quant == '4bit' else 'no quantization'}),"
                  f" {mode}")
            print(f"  {'tool':<13}{'tokens/s':>9}{'tokens':>8}{'fill':>6}{'train s':>9}{'wall s':>8}{mem:>14}"
                  f"{'final loss':>11}  lorakit ratio (tokens/s, memory)")
            med = {}
            for tool in w.tools:
                runs = [r for r in results if (r["tool"], r["mode"], r["quant"]) == (tool, mode, quant)]
                if not runs:
                    continue
                m = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "tokens", "fill", "train_s",
                                                                        "wall_s", "final_loss")}
                m["mem"] = statistics.median(r.get("cuda_peak_mb", 0) if w.cuda else r["peak_rss_mb"] for r in runs)
                med[tool] = m
            for tool, m in med.items():
                ratio = ""
                if tool != "lorakit" and "lorakit" in med:
                    ratio = (f"{med['lorakit']['tokens_per_s'] / m['tokens_per_s']:.2f}x, "
                             f"{med['lorakit']['mem'] / m['mem']:.2f}x")
                print(f"  {tool:<13}{m['tokens_per_s']:>9.1f}{m['tokens']:>8.0f}{m['fill']:>6.2f}{m['train_s']:>9.1f}"
                      f"{m['wall_s']:>8.1f}{m['mem']:>14.0f}{m['final_loss']:>11.4f}  {ratio}")
            breakdown([r for r in results if (r["mode"], r["quant"]) == (mode, quant)], w.tools)
            if w.profile:
                profiles(w, [r for r in results if (r["mode"], r["quant"]) == (mode, quant) and r.get("profile")])


def breakdown(runs: list[dict], tools: list[str]) -> None:
    """Wall seconds per optimizer step split into parts (benchmarks/peers/measure.py), medians over each tool's runs."""
    rows = {}
    for tool in tools:
        got = [r["breakdown"] for r in runs if r["tool"] == tool and r.get("breakdown")]
        if got:
            rows[tool] = {k: statistics.median(b["per_step_s"][k] for b in got) for k in got[0]["per_step_s"]} | {
                "fwd+bwd": statistics.median(b["per_step_s"]["forward"] + b["per_step_s"]["backward"] for b in got),
                "wall": statistics.median(b["wall_per_step_s"] for b in got), "n": len(got)}
    if not rows:
        return
    cols = ("data", "forward", "backward", "fwd+bwd", "clip", "optimizer", "callbacks", "log_save", "rest", "wall")
    print("  step time: s per optimizer step after the first 2 (medians; forward includes the loss)")
    print(f"  {'tool':<13}" + "".join(f"{c:>10}" for c in cols) + f"{'runs':>6}")
    for tool, m in rows.items():
        print(f"  {tool:<13}" + "".join(f"{m[c]:>10.3f}" for c in cols) + f"{m['n']:>6}")


def profiles(w, runs: list[dict], top: int = 16) -> None:
    """Side by side: each tool's self CPU seconds per forward+backward in the ops that cost any tool the most."""
    by_tool = {}
    for r in runs:  # the first run of each tool
        by_tool.setdefault(r["tool"], {name: (s, n) for name, s, n in r["profile"]["ops"]} | {
            "(all ops)": (r["profile"]["self_s_per_step"], 0)})
    if not by_tool:
        return
    names = sorted({n for ops in by_tool.values() for n in ops}, key=lambda n: -max(o.get(n, (0, 0))[0]
                                                                                    for o in by_tool.values()))
    print(f"  profile: self CPU s per training step (forward+backward, {w.profile} steps after 2; calls per step)")
    print(f"  {'op':<44}" + "".join(f"{t:>22}" for t in by_tool))
    for name in names[:top + 1]:
        cells = [f"{ops[name][0]:8.3f} ({ops[name][1]:>5})" if name in ops else f"{'-':>16}"
                 for ops in by_tool.values()]
        print(f"  {name[:44]:<44}" + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", action="store_true", help="install the peers first (benchmarks/setup_peers.sh)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--modes", default="defaults,best")
    p.add_argument("--quant", default="none,4bit", help="comma list of none|4bit")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lock", default="/tmp/lorakit-heavy.lock", help="flock this file around each run ('' = none)")
    p.add_argument("--work", help="keep configs, logs and results here (default: a new temporary directory)")
    p.add_argument("--json", help="also write every run's measurements here")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N training steps of each run (after 2) and print the top ops side by side; "
                        "the profiler slows those runs, so take speed figures from runs without it")
    w = p.parse_args()
    w.modes, w.quants, w.tools = w.modes.split(","), w.quant.split(","), w.tools.split(",")
    if not DATA.is_file():
        sys.exit(f"{DATA} not found (the benchmark reads ../shared/data)")
    if w.setup:
        subprocess.run(["bash", str(HERE / "setup_peers.sh")], check=True)
    for tool in w.tools:
        if not Path(python_of(tool)).exists():
            sys.exit(f"{tool}: no venv at {BENCH_HOME / tool}; run with --setup (or bash benchmarks/setup_peers.sh)")
    import torch

    from lora_kit.models.load import resolve_model
    from lora_kit.models.memory import cpu_bf16_is_faster

    w.model, w.cuda = resolve_model("smollm2-135m"), torch.cuda.is_available()
    # best mode: every tool in the dtype lorakit's `auto` picks here, measured once (CPUs differ: an AVX-512 Xeon
    # without AMX ran bf16 ~25% slower than fp32, an AMD EPYC with avx512_bf16 ~2.2x faster)
    w.bf16 = w.cuda or cpu_bf16_is_faster()
    w.dir = Path(w.work or tempfile.mkdtemp(prefix="compare-peers-")).resolve()
    w.dir.mkdir(parents=True, exist_ok=True)
    prepare(w.dir)
    print(f"compare_peers: model {w.model}, work dir {w.dir}, best mode in {'bf16' if w.bf16 else 'fp32'}",
          flush=True)
    results = []
    for i in range(w.repeats):
        for quant in w.quants:
            for mode in w.modes:
                order = w.tools[i % len(w.tools):] + w.tools[:i % len(w.tools)]  # interleaved, rotating who goes first
                for tool in order:
                    r = one_run(w, tool, mode, quant, i)
                    if r:
                        results.append(r)
    if w.json:
        Path(w.json).write_text(json.dumps(results, indent=1))
    report(w, results)


if __name__ == "__main__":
    main()
