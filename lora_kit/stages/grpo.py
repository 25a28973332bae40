"""`lorakit grpo`: group-relative policy optimisation (Shao et al. 2024) on a LoRA adapter through TRL's GRPOTrainer,
with weighted rewards (lora_kit.training.rewards) and a held-out evaluation of the greedy answers every `eval_steps`.

The reference is the starting adapter frozen beside the trained one (TRL copies it to adapter `ref`): the base itself
for a fresh LoRA (its B is zero), the SFT policy with `sft_adapter=`; one base model either way. TRL's trainer, not a
loop written here as PPO had to be: it brings the Trainer's checkpoints, resume (exact once its sampler is seeded per
epoch, below), processes and loss variants (DAPO, Dr. GRPO) that a loop would rewrite.
benchmarks/grpo_trainer_vs_loop.py times it against a minimal loop (BENCHMARKS.md "GRPO" says what was measured).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import TrainerCallback, set_seed
from trl import GRPOConfig, GRPOTrainer

from lora_kit.data.pairs import fitted_prompts, read_prompts_with_answers
from lora_kit.data.records import split_eval
from lora_kit.errors import LorakitError
from lora_kit.evaluate.tasks import generate_answers
from lora_kit.models.builder import build
from lora_kit.models.load import compute_dtype
from lora_kit.models.lora import count_parameters
from lora_kit.recipe import GE0, GE1, POSITIVE, DataArgs, LoraArgs, ModelArgs, TrainArgs, arg, section
from lora_kit.rundir import log_metrics
from lora_kit.templates import segments
from lora_kit.training.rewards import RewardModel, load_reward_fn, parse_weights, reward_callables
from lora_kit.training.run import (
    install_callbacks,
    is_main_process,
    open_run,
    run_trainer,
    save_run,
    training_arguments,
)


@dataclass
class Config(ModelArgs, DataArgs, TrainArgs):
    """`lorakit grpo` recipe keys."""

    lora: LoraArgs = section(LoraArgs, "LoRA adapter trained when no sft_adapter is given")
    sft_adapter: str = arg("", "adapter the policy starts from (e.g. `lorakit sft` output; also the frozen reference)")
    reward_fn: str = arg("", "reward `fn`: package.module:function(prompts, responses) -> floats")
    reward_adapter: str = arg("", "reward `model`: output_dir of `lorakit rm` (scored with this run's template)")
    rewards: str = arg("", "weighted rewards name:weight,... of sentiment | segment_f1 | format | han_share | fn | "
                           "model (han_share is always logged, at weight 0 unless listed)")
    num_generations: int = arg(4, "completions sampled per prompt: the group whose mean is the baseline", "[2, inf)")
    max_new_tokens: int = arg(16, "tokens sampled per completion", GE1)
    temperature: float = arg(1.0, "sampling temperature", POSITIVE)
    top_p: float = arg(1.0, "nucleus sampling (1 = off)", "(0, 1]")
    top_k: int = arg(0, "top-k sampling (0 = off)", GE0)
    beta: float = arg(0.04, "KL coefficient to the reference (Shao et al. 2024: 0.04); 0 = no reference pass", GE0)
    epsilon: float = arg(0.2, "policy-ratio clip", POSITIVE)
    loss_type: str = arg("grpo", "TRL GRPO loss: grpo (per-sequence mean, Shao et al.) | dapo | dr_grpo | bnpo")
    scale_rewards: str = arg("group", "advantage = (r - group mean) / std of: group (GRPO) | batch | none (Dr. GRPO)")
    eval_data: str = arg("", "held-out prompts with answers (default: the eval_fraction split of data)")
    eval_samples: int = arg(64, "held-out prompts answered greedily at each evaluation", GE0)
    eval_steps: int = arg(0, "evaluate every N steps (0 = save_steps), and at step 0 and the last step", GE0)


def prompt_text(tokenizer, template, messages: list[dict]) -> str:
    """The generation prompt as text in the training template (ends with the assistant prefix)."""
    return "".join(t for t, _ in segments(tokenizer, template, messages, generation=True))


def trl_reward(name: str, fn):
    """A lorakit reward as a TRL reward function (TRL passes dataset columns as keyword arguments)."""
    def reward(prompts, completions, reference=None, conversation=None, **_):
        refs = [r or None for r in reference] if reference is not None else None
        return fn([m[-1]["content"] for m in conversation], completions, refs, conversation)

    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


class EpochSeededGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose prompt order is a function of the epoch. TRL's RepeatSampler draws every epoch from one
    generator seeded once, so a run resumed at a later epoch would replay the first epoch's order; seeding it with
    seed + epoch at each epoch (the Trainer calls set_epoch) makes resume exact."""

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if getattr(sampler, "seed", None) is not None:
            sampler.set_epoch = lambda epoch: sampler.generator.manual_seed(sampler.seed + epoch)
        return sampler


class HeldOutEval(TrainerCallback):
    """Greedy answers to held-out prompts scored by every reward, written to metrics.jsonl as eval_reward/<name> and
    eval_reward (the weighted sum): at step 0, every `every` steps and at the end. Greedy decoding draws no random
    numbers, so training continues exactly as without it."""

    def __init__(self, out: Path, rows: list, ids: list, rewards: list, weights: dict, tokenizer, template, cfg,
                 every: int):
        self.out, self.rows, self.ids, self.rewards, self.weights = out, rows, ids, rewards, weights
        self.tokenizer, self.template, self.cfg, self.every = tokenizer, template, cfg, every
        self.trainer, self.last = None, {}

    def evaluate(self, step: int) -> None:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        model.eval()
        messages = [m for m, _ in self.rows]
        answers = generate_answers(model, self.tokenizer, self.template, messages,
                                   max_new_tokens=self.cfg.max_new_tokens,
                                   batch_size=self.cfg.batch_size * self.cfg.num_generations, progress=False,
                                   encoded=self.ids)  # cut to cutoff_len as the training prompts are
        model.train(was_training)
        refs = [r for _, r in self.rows]
        row, total = {"step": step}, 0.0
        for name, fn in self.rewards:
            mean = sum(fn([m[-1]["content"] for m in messages], answers, refs, messages)) / len(answers)
            row[f"eval_reward/{name}"] = round(mean, 6)
            total += self.weights.get(name, 0.0) * mean
        row["eval_reward"] = round(total, 6)
        self.last = row
        log_metrics(self.out / "metrics.jsonl", row)
        print("lorakit grpo: held-out " + ", ".join(f"{k[12:] or 'weighted'} {v:.3f}" for k, v in row.items()
                                                    if k.startswith("eval_reward")) + f" at step {step}", flush=True)

    def on_train_begin(self, args, state, control, **kw):
        if state.global_step == 0 and is_main_process():
            self.evaluate(0)

    def on_step_end(self, args, state, control, **kw):
        if (state.global_step % self.every == 0 or state.global_step == state.max_steps) and is_main_process():
            self.evaluate(state.global_step)


def run(cfg: Config, dry_run: bool = False) -> Path:
    """Train a LoRA adapter with GRPO on TRL's GRPOTrainer; returns the output directory."""

    extra = (("fn",) if cfg.reward_fn else ()) + (("model",) if cfg.reward_adapter else ())
    weights = parse_weights(cfg.rewards, extra)
    for name in extra:  # a reward given but not weighted counts once, rather than being silently left out
        if name not in weights:
            weights[name] = 1.0
            print(f"lorakit grpo: reward '{name}' is not in rewards={cfg.rewards!r}; weighted 1", flush=True)
    if not any(weights.values()):
        raise LorakitError("no reward: set rewards=name:weight,... (sentiment, segment_f1, format), reward_fn= or "
                           "reward_adapter=")
    if cfg.num_generations < 2:
        raise LorakitError("num_generations must be at least 2 (the group mean is the baseline)")
    out, ckpt, base, tokenizer, template = open_run(cfg)
    rows = read_prompts_with_answers(cfg.data, cfg.max_samples, cfg.skip_bad_records)
    train, held = split_eval(rows, 0.0 if cfg.eval_data else cfg.eval_fraction, cfg.seed)
    if cfg.eval_data:
        held = read_prompts_with_answers(cfg.eval_data, 0, cfg.skip_bad_records)
    held = held[: cfg.eval_samples]
    n_train = len(train)
    train, train_ids = fitted_prompts(train, tokenizer, template, cfg.cutoff_len, cfg.overlong, messages=lambda r: r[0],
                                      training=cfg.data)
    held, held_ids = fitted_prompts(held, tokenizer, template, cfg.cutoff_len, cfg.overlong, messages=lambda r: r[0])
    print(f"lorakit grpo: {cfg.data}: {len(train)} training prompts ({n_train - len(train)} dropped as over-long), "
          f"{len(held)} held-out prompts ({cfg.eval_data or 'split from data'})", flush=True)

    set_seed(cfg.seed)
    dtype = compute_dtype(cfg.dtype)
    if cfg.sft_adapter and not (Path(cfg.sft_adapter) / "adapter_config.json").is_file():
        raise LorakitError(f"{cfg.sft_adapter}: sft_adapter must be an adapter directory (adapter_config.json)")
    built = build(cfg, base, tokenizer, adapter=cfg.sft_adapter or "lora")
    model = built.model
    reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
    reward_model = RewardModel(cfg.reward_adapter, base, tokenizer, template, cfg) if cfg.reward_adapter else None
    rewards = reward_callables(weights, reward_fn, reward_model)
    trainable, total = count_parameters(model)
    print(f"lorakit grpo: {base} ({cfg.quantization}, {str(dtype).replace('torch.', '')}), trainable {trainable:,} / "
          f"{total:,}; rewards " + ", ".join(f"{n} x{weights.get(n, 0.0):g}" for n, _ in rewards) +
          f"; {cfg.batch_size * cfg.grad_accum} prompts x {cfg.num_generations} completions x {cfg.max_new_tokens} "
          f"tokens per step; reference = {'sft adapter' if cfg.sft_adapter else 'base'} (frozen copy)", flush=True)
    if dry_run:
        return out

    # a prompt cut to its last cutoff_len tokens goes to TRL as the text of those tokens (TRL tokenizes text prompts)
    data = [{"prompt": prompt_text(tokenizer, template, m) if len(ids) < cfg.cutoff_len else tokenizer.decode(ids),
             "reference": r or "", "conversation": m} for (m, r), ids in zip(train, train_ids)]
    args = training_arguments(
        cfg, out, dtype, args_class=GRPOConfig, gradient_checkpointing=cfg.gradient_checkpointing,
        per_device_train_batch_size=cfg.batch_size * cfg.num_generations, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        beta=cfg.beta, epsilon=cfg.epsilon, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        reward_weights=[weights.get(n, 0.0) for n, _ in rewards], num_iterations=1, disable_dropout=True,
        log_completions=False)
    trainer = EpochSeededGRPOTrainer(model=model, reward_funcs=[trl_reward(n, fn) for n, fn in rewards], args=args,
                                     train_dataset=datasets.Dataset.from_list(data), processing_class=tokenizer)
    install_callbacks(trainer, out, desc="grpo")
    held_eval = None
    if held:
        held_eval = HeldOutEval(out, held, held_ids, rewards, weights, tokenizer, template, cfg,
                                cfg.eval_steps or cfg.save_steps)
        held_eval.trainer = trainer
        trainer.add_callback(held_eval)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    run_trainer(trainer, ckpt)
    info = {"prompts": len(train), "held_out_prompts": len(held)}
    if held_eval and held_eval.last:
        info.update({k.replace("eval_reward", "held_out_reward"): v for k, v in held_eval.last.items() if k != "step"})
    return save_run(out, trainer.model, tokenizer, cfg, "grpo", base, trainer=trainer,
                    new_token_ids=built.new_token_ids, **info)
