"""Seconds per GRPO step: TRL's GRPOTrainer (as `lorakit grpo` runs it) against a minimal GRPO loop written here on
transformers/peft (sample G completions per prompt, group-normalised advantages, one policy-gradient update with the
k3 KL to the adapter-off reference), on the same model, prompts, group size, completion length and reward.

    flock /tmp/lorakit-heavy.lock python benchmarks/grpo_trainer_vs_loop.py [--steps 6] [--model smollm2-135m]

Each side runs `--steps` steps in this process, interleaved twice (loop, trainer, loop, trainer); the median step time
of each side's steps after its first is printed (the first includes warm-up).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from trl import GRPOTrainer

from lora_kit.data.pairs import read_prompts_with_answers
from lora_kit.models.load import load_model, load_tokenizer, resolve_model
from lora_kit.models.lora import attach_lora
from lora_kit.recipe import LoraArgs, load_config
from lora_kit.stages import grpo
from lora_kit.templates import prompt_ids, resolve
from lora_kit.training.rewards import sentiment

settings = dict(batch=4, group=4, new_tokens=8, lr=2e-4, beta=0.04)


def loop_steps(model_name: str, steps: int) -> list[float]:
    """The hand-written loop: returns seconds per step."""
    base = resolve_model(model_name)
    tok = load_tokenizer(base)
    template = resolve("auto", tok)
    torch.manual_seed(0)
    model = attach_lora(load_model(base, dtype="fp32"), LoraArgs(r=8, alpha=32, dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["lr"])
    rows = read_prompts_with_answers("zh_sentiment_train")
    B, G = settings["batch"], settings["group"]
    times = []
    for step in range(steps):
        t0 = time.time()
        batch = rows[step * B:(step + 1) * B]
        queries = [prompt_ids(tok, template, m) for m, _ in batch for _ in range(G)]
        width = max(map(len, queries))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(q)) + q for q in queries])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(q) for q in queries])[:, None]).long()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 max_new_tokens=settings["new_tokens"],
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        resp = out[:, width:]
        done = (resp == tok.eos_token_id).cumsum(-1) - (resp == tok.eos_token_id).long()
        rmask = (done == 0).float()
        texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(resp, rmask)]
        rewards = torch.tensor(sentiment(None, texts, [r for _, r in batch for _ in range(G)]))
        groups = rewards.view(-1, G)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
        full_mask = torch.cat([mask, rmask.long()], 1)

        def logps():
            logits = model(input_ids=out, attention_mask=full_mask).logits[:, width - 1:-1].float()
            return torch.log_softmax(logits, -1).gather(-1, resp[..., None]).squeeze(-1)

        with torch.no_grad(), model.disable_adapter():
            ref = logps()
        logp = logps()
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = -adv[:, None] * torch.exp(logp - logp.detach()) + settings["beta"] * kl
        loss = ((per_token * rmask).sum(1) / rmask.sum(1).clamp(min=1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
    return times


def trainer_steps(model_name: str, steps: int, work: Path) -> list[float]:
    """`lorakit grpo` (TRL's GRPOTrainer) with the same settings: returns seconds per training_step."""
    times = []
    original = GRPOTrainer.training_step

    def timed(self, *a, **kw):
        t0 = time.time()
        result = original(self, *a, **kw)
        times.append(time.time() - t0)
        return result

    GRPOTrainer.training_step = timed
    try:
        shutil.rmtree(work, ignore_errors=True)
        cfg = load_config(grpo.Config, "grpo_zh", [
            f"model={model_name}", f"output_dir={work}", "dtype=fp32", f"max_steps={steps}", "save_steps=1000",
            "eval_steps=1000", "eval_samples=0", f"batch_size={settings['batch']}",
            f"num_generations={settings['group']}", f"max_new_tokens={settings['new_tokens']}",
            f"learning_rate={settings['lr']}", f"beta={settings['beta']}", "rewards=sentiment:1", "seed=0"])
        grpo.run(cfg)
    finally:
        GRPOTrainer.training_step = original
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/lorakit-grpo-vs-loop")
    args = ap.parse_args()
    loop, trainer = [], []
    for rep in range(args.reps):
        loop += loop_steps(args.model, args.steps)[1:]
        trainer += trainer_steps(args.model, args.steps, Path(args.workdir) / str(rep))[1:]
    print(f"{settings}, fp32, {args.model}")
    print(f"hand loop    s/step median {statistics.median(loop):.2f} (min {min(loop):.2f}, max {max(loop):.2f})")
    print(f"GRPOTrainer  s/step median {statistics.median(trainer):.2f} (min {min(trainer):.2f}, "
          f"max {max(trainer):.2f})")
    print(f"ratio trainer / loop {statistics.median(trainer) / statistics.median(loop):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
