"""`lorakit ppo`: RLHF with PPO (InstructGPT step 3) on LoRA adapters over one shared base (roles in roles.py).

Written by hand on transformers/peft/torch because TRL 1.16 has no PPO trainer (not even in trl.experimental); the
maths is core.py.
Rollouts sample with the KV cache; checkpoints hold actor, critic, optimizer, KL controller, reward statistics, RNG and
data position, written atomically, so `resume=true` continues bit-for-bit (fp32).

Under torchrun (`--nproc N`) every rank holds the whole model, rolls out its own `batch_size` prompts of each global
batch, and the ranks all-reduce gradients and every statistic (ppo_core) so that they take identical steps; rank 0
writes all files.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from lora_kit.data.pairs import fitted_prompts, read_prompts
from lora_kit.data.records import (
    Collator,
    conversations,
    read_records,
    split_eval,
    tokenize_conversations,
)
from lora_kit.errors import LorakitError
from lora_kit.models.builder import build
from lora_kit.models.load import check_checkpoint, compute_dtype
from lora_kit.models.lora import count_parameters
from lora_kit.recipe import GE0, GE1, POSITIVE, DataArgs, LoraArgs, ModelArgs, TrainArgs, arg, section
from lora_kit.rundir import log_metrics, write_text
from lora_kit.stages.ppo import core as ppo_core
from lora_kit.stages.ppo.core import KLController, RunningMoments, all_gather, init_processes, world
from lora_kit.stages.ppo.roles import Roles
from lora_kit.templates import encode
from lora_kit.training import interrupt
from lora_kit.training.rewards import BUILTIN, load_reward_fn, parse_weights
from lora_kit.training.run import is_main_process, open_run, plot_metrics, save_run, wait_for_everyone

PLOT_KEYS = ("reward", "eval_reward", "kl", "entropy", "response_len", "clipfrac", "value_loss")


@dataclass
class Config(ModelArgs, DataArgs, TrainArgs):
    """The `lorakit ppo` recipe: actor/critic LoRA, reward source, sampling and PPO hyperparameters."""
    lora: LoraArgs = section(LoraArgs, "LoRA for the actor (when no sft_adapter) and the critic")
    sft_adapter: str = arg("", "SFT adapter the actor starts from (also the frozen reference); empty = base")
    reward_adapter: str = arg("", "reward model from `lorakit rm` (adapter + score head)")
    reward_fn: str = arg("", "rule-based reward instead: package.module:function(prompts, responses) -> floats")
    rewards: str = arg("", "verifiable rewards added to the score, name:weight,... of han_share (share of Chinese "
                           "characters: a language-consistency reward against drift out of Chinese, BENCHMARKS.md)")
    max_new_tokens: int = arg(48, "tokens sampled per response", GE1)
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same temperature)", POSITIVE)
    top_k: int = arg(0, "top-k sampling (0 = off)", GE0)
    top_p: float = arg(1.0, "nucleus sampling (1 = off)", "(0, 1]")
    mini_batch_size: int = arg(4, "prompts per PPO update; batch_size prompts are rolled out per step", GE1)
    ppo_epochs: int = arg(2, "passes over each rollout batch", GE1)
    clip_range: float = arg(0.2, "PPO ratio clip (Schulman et al. 2017)", POSITIVE)
    value_clip: float = arg(0.2, "value prediction clip around the rollout values", POSITIVE)
    vf_coef: float = arg(0.1, "value loss weight (TRL's PPOv2 default)", GE0)
    gamma: float = arg(1.0, "discount", "[0, 1]")
    lam: float = arg(0.95, "GAE lambda", "[0, 1]")
    init_kl_coef: float = arg(0.05, "per-token KL penalty coefficient at the start", GE0)
    kl_target: float = arg(6.0, "adaptive KL target per response (0 = fixed coefficient)", GE0)
    kl_horizon: int = arg(10000, "adaptive KL horizon (Ziegler et al. 2019)", GE1)
    normalize_reward: bool = arg(True, "normalise scores with running mean/std")
    reward_clip: float = arg(10.0, "clip normalised scores to ±this", POSITIVE)
    value_from_reward: bool = arg(True, "initialise the critic from the reward model (InstructGPT)")
    ptx_data: str = arg("", "PPO-ptx: SFT dataset mixed into every update (InstructGPT)")
    ptx_coef: float = arg(0.0, "PPO-ptx: weight of the language-modelling loss", GE0)
    eval_samples: int = arg(16, "held-out prompts scored at the start and end (with eval_fraction > 0)", GE0)


# ---------------------------------------------------------------------------------------------------- rollouts
def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists padded on the left, so generation continues every row's end."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def sample(roles, cfg, tokenizer, queries: list[list[int]]) -> dict:
    """Generate responses with the actor; ids/mask/positions cover prompt + response, `rmask` the response tokens."""
    q_ids, q_mask = (t.to(roles.device) for t in left_pad(queries, tokenizer.pad_token_id))
    gen = dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
               max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, use_cache=True)
    with torch.no_grad():
        out = roles.generate(input_ids=q_ids, attention_mask=q_mask, **gen)
    resp = out[:, q_ids.shape[1]:]
    if resp.shape[1] == 0:
        raise LorakitError("the actor generated nothing; raise max_new_tokens")
    is_eos = resp == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    rmask = (~after_eos).long()
    resp = resp.masked_fill(after_eos, tokenizer.pad_token_id)
    mask = torch.cat([q_mask, rmask], 1)
    return {"ids": torch.cat([q_ids, resp], 1), "mask": mask, "positions": (mask.cumsum(-1) - 1).clamp(min=0),
            "start": q_ids.shape[1], "rmask": rmask.float(), "resp": resp}


def response_texts(batch, tokenizer) -> list[str]:
    """The sampled responses decoded without padding or special tokens."""
    return [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(batch["resp"], batch["rmask"])]


VERIFIABLE = ("han_share",)  # the built-in rewards that need no reference answer (PPO prompts have none)


def verifiable_weights(spec: str) -> dict[str, float]:
    """{name: weight} of `rewards=`, refused in one line for a reward that needs reference answers."""
    weights = parse_weights(spec)
    for name in weights:
        if name not in VERIFIABLE:
            raise LorakitError(f"rewards: '{name}' needs reference answers, which PPO prompts do not have "
                               f"(PPO adds: {', '.join(VERIFIABLE)}; use lorakit grpo for answer rewards)")
    return weights


def score(roles, cfg, tokenizer, template, reward_fn, prompts: list[list[dict]], texts: list[str]) -> torch.Tensor:
    """One reward per response: `reward_fn` on the texts, else the reward model on prompt + response; plus the
    weighted verifiable rewards of `rewards=`."""
    if reward_fn is not None:
        vals = reward_fn([p[-1]["content"] for p in prompts], texts)
        if len(vals) != len(texts):
            raise LorakitError(f"reward_fn returned {len(vals)} values for {len(texts)} responses")
        total = torch.tensor([float(v) for v in vals], device=roles.device)
    else:
        seqs = [encode(tokenizer, template, p + [{"role": "assistant", "content": t}])[0]
                for p, t in zip(prompts, texts)]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        total = roles.scores(ids, tokenizer.pad_token_id)
    for name, weight in verifiable_weights(cfg.rewards).items():
        total = total + weight * torch.tensor(BUILTIN[name](None, texts), device=total.device, dtype=total.dtype)
    return total


# ---------------------------------------------------------------------------------------------------- one PPO step
def ppo_step(roles, opt, sched, cfg, tokenizer, template, reward_fn, prompts, queries, kl_ctl, moments, ptx_batch=None):
    """Roll out, score, compute advantages, update actor and critic; returns the logged statistics (over all ranks)."""
    world = ppo_core.world()[1]
    b = sample(roles, cfg, tokenizer, queries)
    texts = response_texts(b, tokenizer)
    raw = score(roles, cfg, tokenizer, template, reward_fn, prompts, texts).float()
    args = (b["ids"], b["mask"], b["positions"], b["start"])
    m = b["rmask"]
    with torch.no_grad():
        old_logp = ppo_core.logprobs_from_logits(roles.policy_logits(*args) / cfg.temperature, b["resp"])
        ref_logp = ppo_core.logprobs_from_logits(roles.ref_logits(*args) / cfg.temperature, b["resp"])
        old_values = roles.values(*args)
    scores = raw
    if cfg.normalize_reward:
        moments.update(raw)
        scores = moments.normalise(raw).clamp(-cfg.reward_clip, cfg.reward_clip)
    rewards, kl = ppo_core.token_rewards(scores, old_logp, ref_logp, m, kl_ctl.value)
    adv, returns = ppo_core.gae(rewards, old_values, m, cfg.gamma, cfg.lam)
    adv = ppo_core.masked_whiten(adv, m)

    keys = ("pg_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy", "ptx_loss")
    stats = {k: [] for k in keys}
    n = len(queries)
    use_ptx = ptx_batch is not None and cfg.ptx_coef > 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n)
        for i in range(0, n, cfg.mini_batch_size):
            idx = order[i:i + cfg.mini_batch_size]
            # the mini-batch's response tokens on all ranks: the loss denominator
            count = ppo_core.all_sum(m[idx].sum())
            mb = (b["ids"][idx], b["mask"][idx], b["positions"][idx], b["start"])
            logits = roles.policy_logits(*mb) / cfg.temperature
            logp = ppo_core.logprobs_from_logits(logits, b["resp"][idx])
            pg, clipfrac, approx_kl = ppo_core.policy_loss(logp, old_logp[idx], adv[idx], m[idx], cfg.clip_range, count)
            vl, vf_clip = ppo_core.value_loss(roles.values(*mb), old_values[idx], returns[idx], m[idx], cfg.value_clip,
                                              count)
            loss = pg + cfg.vf_coef * vl
            # a per-rank mean: the all-reduce sums the ranks' shares to the mean
            ptx = roles.lm_loss(ptx_batch) / world if use_ptx else torch.zeros((), device=roles.device)
            loss = loss + cfg.ptx_coef * ptx if use_ptx else loss
            loss.backward()
            roles.all_reduce_grads()
            torch.nn.utils.clip_grad_norm_(roles.trainable, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                ent = ppo_core.masked_mean(ppo_core.entropy_from_logits(logits), m[idx], count=count)
                vals = ppo_core.all_sum(torch.stack([v.detach().float()
                                                     for v in (pg, vl, clipfrac, vf_clip, approx_kl, ent, ptx)]))
            for k, v in zip(keys, vals.tolist()):
                stats[k].append(v)
    if not use_ptx:
        del stats["ptx_loss"]
    kl_seq = ppo_core.global_mean(kl.sum(-1))
    kl_ctl.update(kl_seq, n * world)
    row = {k: round(sum(v) / len(v), 6) for k, v in stats.items() if v}
    row.update(reward=round(ppo_core.global_mean(raw), 6), kl=round(kl_seq, 6), kl_coef=round(kl_ctl.value, 6),
               response_len=round(ppo_core.global_mean(m.sum(-1)), 3), lr=sched.get_last_lr()[0])
    return row, texts


@torch.no_grad()
def evaluate(roles, cfg, tokenizer, template, reward_fn, prompts, seed: int):
    """Mean score and KL on held-out prompts with a fixed sampling seed, leaving the training RNG untouched. Each rank
    scores a contiguous share of the prompts; every rank returns the results of all."""
    rank, world = ppo_core.world()
    share = -(-len(prompts) // world)
    prompts = prompts[rank * share:(rank + 1) * share]
    cuda = [roles.device.index or 0] if roles.device.type == "cuda" else []  # sampling draws from the GPU's RNG there
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed + rank)
        rows, total, kl = [], [], []
        for i in range(0, len(prompts), cfg.batch_size):
            ps = prompts[i:i + cfg.batch_size]
            _, queries = fitted_prompts(ps, tokenizer, template, cfg.cutoff_len, cfg.overlong)  # (all fit: see run)
            b = sample(roles, cfg, tokenizer, queries)
            texts = response_texts(b, tokenizer)
            s = score(roles, cfg, tokenizer, template, reward_fn, ps, texts)
            args = (b["ids"], b["mask"], b["positions"], b["start"])
            lp = ppo_core.logprobs_from_logits(roles.policy_logits(*args) / cfg.temperature, b["resp"])
            ref = ppo_core.logprobs_from_logits(roles.ref_logits(*args) / cfg.temperature, b["resp"])
            kl += ((lp - ref) * b["rmask"]).sum(-1).tolist()
            total += s.tolist()
            rows += [{"prompt": p[-1]["content"], "response": t, "score": round(float(v), 4)}
                     for p, t, v in zip(ps, texts, s)]
    per_rank = ppo_core.all_gather((total, kl, rows))
    total, kl, rows = ([x for part in parts for x in part] for parts in zip(*per_rank))
    return sum(total) / len(total), sum(kl) / len(kl), rows


# ---------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, step: int, roles, opt, sched, kl_ctl, moments, keep: int = 2) -> Path:
    """checkpoints/checkpoint-N, built in a temporary directory and renamed; trainer_state.json marks it complete.
    Called on every rank: rank 0 writes the (identical) weights and optimizer state with every rank's RNG state, the
    others wait until it has."""


    cuda = torch.cuda.get_rng_state() if roles.device.type == "cuda" else None  # rollouts sample on the GPU
    rngs = all_gather((torch.get_rng_state(), random.getstate(), cuda))
    root = out / "checkpoints"
    final = root / f"checkpoint-{step}"
    if not is_main_process():
        wait_for_everyone()
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(roles.trainable_state(), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": [r[0] for r in rngs],
                "python_rng": [r[1] for r in rngs], "cuda_rng": [r[2] for r in rngs]}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, "kl_controller": kl_ctl.state_dict(),
                                                        "reward_moments": moments.state_dict(),
                                                        "world_size": len(rngs)}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted((p for p in root.glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    wait_for_everyone()
    return final


def load_checkpoint(ckpt: Path, roles, opt, sched, kl_ctl, moments) -> int:
    """Every rank reads the checkpoint, and its own RNG state: resume at the world size that wrote it."""


    check_checkpoint(ckpt)
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    rank, size = world()
    if meta.get("world_size", 1) != size:  # the data position and each rank's sampling RNG belong to that world size
        raise LorakitError(f"{ckpt} was written by {meta.get('world_size', 1)} processes; resume it with --nproc "
                           f"{meta.get('world_size', 1)} (this run has {size})")
    roles.load_trainable_state(load_file(str(ckpt / "trainable.safetensors")))
    state = torch.load(ckpt / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rngs = [state["torch_rng"], state["python_rng"]]
    if torch.is_tensor(rngs[0]):  # written before lorakit ppo ran across processes: one rank
        rngs = [[rngs[0]], [rngs[1]]]
    torch.set_rng_state(rngs[0][rank])
    random.setstate(rngs[1][rank])
    cuda = state.get("cuda_rng", [None] * size)[rank]
    if cuda is not None and roles.device.type == "cuda":
        torch.cuda.set_rng_state(cuda)
    kl_ctl.load_state_dict(meta["kl_controller"])
    moments.load_state_dict(meta["reward_moments"])
    return int(meta["global_step"])


# ---------------------------------------------------------------------------------------------------- run
def _ptx_batches(cfg, tokenizer, template):
    convs, _ = conversations(read_records(cfg.ptx_data), "auto", cfg.skip_bad_records)
    examples, _ = tokenize_conversations(convs, tokenizer, template, cfg.cutoff_len, cfg.overlong)
    collate = Collator(tokenizer.pad_token_id)
    return lambda step: collate([examples[(step * cfg.mini_batch_size + j) % len(examples)]
                                 for j in range(cfg.mini_batch_size)])


def run(cfg: Config, dry_run: bool = False) -> Path:
    """Train the actor (and critic) adapters with PPO against the reward; returns the output directory."""
    if bool(cfg.reward_adapter) == bool(cfg.reward_fn):
        raise LorakitError("give exactly one of reward_adapter=DIR (from `lorakit rm`) or "
                           "reward_fn=package.module:function")
    if cfg.batch_size % cfg.mini_batch_size:
        raise LorakitError(f"batch_size ({cfg.batch_size}) must be a multiple of "
                           f"mini_batch_size ({cfg.mini_batch_size})")
    reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
    extra = verifiable_weights(cfg.rewards)
    rank, world = init_processes()

    def say(msg: str) -> None:
        if rank == 0:
            print(f"lorakit ppo: {msg}", flush=True)

    out, ckpt, base, tokenizer, template = open_run(cfg)
    prompts = read_prompts(cfg.data, cfg.max_samples, cfg.skip_bad_records)
    train, held = split_eval(prompts, cfg.eval_fraction, cfg.seed)
    held = held[: cfg.eval_samples]
    n_prompts = len(train) + len(held)
    train, queries = fitted_prompts(train, tokenizer, template, cfg.cutoff_len, cfg.overlong, training=cfg.data)
    held, _ = fitted_prompts(held, tokenizer, template, cfg.cutoff_len, cfg.overlong)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dtype = compute_dtype(cfg.dtype)
    built = build(cfg, base, tokenizer, adapter="none")  # the roles attach their adapters
    model = built.model
    if cfg.gradient_checkpointing:
        say("gradient_checkpointing is not used by PPO (the model runs in eval mode, no dropout)")
    roles = Roles(model, cfg.lora, sft_adapter=cfg.sft_adapter, reward_adapter=cfg.reward_adapter,
                  value_from_reward=cfg.value_from_reward, token_rows=built.token_rows)
    roles.broadcast_trainable()
    if rank:  # identical weights, but each rank samples its own responses
        torch.manual_seed(cfg.seed + rank)
    trainable, total = count_parameters(roles.model)
    updates = cfg.max_steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    per_step = f"{world} processes x {cfg.batch_size}" if world > 1 else f"{cfg.batch_size}"
    say(f"{base} ({cfg.quantization}, {str(dtype).replace('torch.', '')}); {len(train)} prompts "
        f"({len(held)} held out, {n_prompts - len(train) - len(held)} dropped as over-long); actor + critic "
        f"trainable {trainable:,} / {total:,}; reward = "
        f"{cfg.reward_adapter or cfg.reward_fn}" + "".join(f" + {w:g} x {n}" for n, w in extra.items()) +
        f"; reference = {'sft adapter' if cfg.sft_adapter else 'base'}; "
        f"{per_step} rollouts x {cfg.max_new_tokens} tokens per step, {updates} updates")
    if dry_run:
        return out

    opt = torch.optim.AdamW(roles.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=int(math.ceil(cfg.warmup_ratio * updates)),
                          num_training_steps=updates)
    kl_ctl, moments = KLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon), RunningMoments()
    ptx = _ptx_batches(cfg, tokenizer, template) if cfg.ptx_data and cfg.ptx_coef > 0 else None
    step = 0
    if ckpt:
        step = load_checkpoint(Path(ckpt), roles, opt, sched, kl_ctl, moments)
        say(f"resumed from {ckpt} at step {step}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"

    def log(row):
        log_metrics(metrics, row)

    samples = {}
    if held and step == 0:
        r, k, samples["before"] = evaluate(roles, cfg, tokenizer, template, reward_fn, held, cfg.seed)
        log({"step": 0, "eval_reward": round(r, 6), "eval_kl": round(k, 6)})
        say(f"held-out mean reward before {r:.4f}")
        if is_main_process():  # written now so a resumed run still shows the samples from before training
            write_text(out / "samples.jsonl", "".join(json.dumps({"when": "before", **s}, ensure_ascii=False) + "\n"
                                                      for s in samples["before"]))

    bar = tqdm(total=cfg.max_steps, initial=step, desc="ppo", unit="step", dynamic_ncols=True,
               disable=not is_main_process())
    interrupt.arm()  # SIGINT/SIGTERM: checkpoint after the current step, then stop (interrupt.py)
    while step < cfg.max_steps:  # data position = f(step); rank r takes the r-th slice of each global batch
        epoch, offset = divmod(step * cfg.batch_size * world, len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        idx = [order[(offset + j) % len(train)] for j in range(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)]
        t0 = time.time()
        row, _ = ppo_step(roles, opt, sched, cfg, tokenizer, template, reward_fn, [train[i] for i in idx],
                          [queries[i] for i in idx], kl_ctl, moments, ptx(step * world + rank) if ptx else None)
        step += 1
        row = {"step": step, **row, "seconds": round(time.time() - t0, 2)}
        if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
            raise LorakitError(f"non-finite PPO statistics at step {step} ({row}); lower learning_rate, then resume")
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            log(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.2f}", refresh=False)
        if interrupt.requested() is not None:
            bar.close()
            interrupt.stop(str(save_checkpoint(out, step, roles, opt, sched, kl_ctl, moments)))
        if step % cfg.save_steps == 0 and step < cfg.max_steps:
            save_checkpoint(out, step, roles, opt, sched, kl_ctl, moments)
    interrupt.arm(False)
    bar.close()
    info = {}
    if held:
        r, k, samples["after"] = evaluate(roles, cfg, tokenizer, template, reward_fn, held, cfg.seed)
        log({"step": step, "eval_reward": round(r, 6), "eval_kl": round(k, 6)})
        info.update(held_out_reward=round(r, 4), held_out_kl=round(k, 4))
        say(f"held-out mean reward after {r:.4f} (KL to reference {k:.3f})")
        if is_main_process():
            old = (out / "samples.jsonl").read_text(encoding="utf-8") if (out / "samples.jsonl").is_file() else ""
            keep = [l for l in old.splitlines() if json.loads(l).get("when") == "before"]  # not a killed run's "after"
            before = "".join(l + "\n" for l in keep)
            write_text(out / "samples.jsonl", before + "".join(json.dumps({"when": "after", **s}, ensure_ascii=False)
                                                               + "\n" for s in samples["after"]))
    if is_main_process():
        roles.save(out)
        plot_metrics(out, PLOT_KEYS, panels=True)
    return save_run(out, _SavedByRoles(roles.model), tokenizer, cfg, "ppo", base, new_token_ids=built.new_token_ids,
                    **info)


class _SavedByRoles:
    """The PeftModel for save_run, whose weights Roles.save already wrote (save_pretrained would also write the
    reference and reward adapters)."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, *a, **kw):
        pass

    def get_base_model(self):
        return self.model.get_base_model()
