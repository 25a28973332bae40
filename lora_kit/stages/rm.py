"""`lorakit rm`: a reward model = LoRA adapter + scalar score head (`score`, saved through modules_to_save) on the base,
trained with InstructGPT's pairwise loss -log σ(r_chosen − r_rejected) by TRL's RewardTrainer; reports held-out
accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import AutoModelForSequenceClassification, set_seed
from trl import RewardConfig, RewardTrainer

from lora_kit.data.pairs import pair_ids, read_pairs
from lora_kit.data.records import split_eval
from lora_kit.errors import LorakitError
from lora_kit.models.builder import build
from lora_kit.models.load import compute_dtype
from lora_kit.models.lora import count_parameters
from lora_kit.recipe import FRACTION, GE0, DataArgs, LoraArgs, ModelArgs, TrainArgs, arg, section
from lora_kit.training.run import (
    final_eval,
    install_callbacks,
    is_main_process,
    open_run,
    run_trainer,
    save_run,
    training_arguments,
)


@dataclass
class Config(ModelArgs, DataArgs, TrainArgs):
    """The `lorakit rm` recipe: model, pairs data, training, LoRA and the reward-centering weight."""
    lora: LoraArgs = section(LoraArgs, "LoRA adapter")
    eval_fraction: float = arg(0.1, "fraction of records (prompts) held out to measure pairwise accuracy", FRACTION)
    center_rewards: float = arg(0.0, "weight of the (r_c + r_r)^2 penalty keeping scores near 0 (0 = off)", GE0)


def encode_pairs(groups, tokenizer, template, cutoff_len: int, overlong: str = "truncate") -> tuple[list[dict], int]:
    """{chosen_ids, rejected_ids} rendered like a conversation ending in the answer (the same text PPO scores), fitted
    to cutoff_len (`pair_ids`); returns (rows, pairs dropped)."""
    rows = [ids for group in groups for p in group
            if (ids := pair_ids(tokenizer, template, p, cutoff_len, overlong)) is not None]
    return [{"chosen_ids": c, "rejected_ids": r} for c, r in rows], sum(len(g) for g in groups) - len(rows)


def run(cfg: Config, dry_run: bool = False) -> Path:
    """Train a LoRA reward model (adapter + score head) on preference pairs; returns the output directory."""
    out, ckpt, base, tokenizer, template = open_run(cfg)
    groups = read_pairs(cfg.data, cfg.max_samples, cfg.skip_bad_records)
    train_groups, held_groups = split_eval(groups, cfg.eval_fraction, cfg.seed)
    train, dropped = encode_pairs(train_groups, tokenizer, template, cfg.cutoff_len, cfg.overlong)
    held, _ = encode_pairs(held_groups, tokenizer, template, cfg.cutoff_len, cfg.overlong)
    if not train:
        raise LorakitError(f"{cfg.data}: no pair left after tokenization (cutoff_len={cfg.cutoff_len})")
    print(f"lorakit rm: {cfg.data}: {len(groups)} records -> {len(train)} training pairs, {len(held)} held-out pairs"
          f" ({dropped} dropped as over-long)", flush=True)

    set_seed(cfg.seed)  # the score head is initialised randomly at load
    dtype = compute_dtype(cfg.dtype)
    # one label, and the tokenizer's pad id: the score head pools the last token that is not pad
    built = build(cfg, base, tokenizer, model_class=AutoModelForSequenceClassification, num_labels=1,
                  pad_token_id=tokenizer.pad_token_id, modules_to_save=["score"], task_type="SEQ_CLS")
    model = built.model
    trainable, total = count_parameters(model)
    print(f"lorakit rm: {base} ({cfg.quantization}, {str(dtype).replace('torch.', '')}), trainable {trainable:,} / "
          f"{total:,} parameters ({trainable / total:.2%}); {cfg.batch_size * cfg.grad_accum} pairs per step",
          flush=True)
    if dry_run:
        return out

    args = training_arguments(
        cfg, out, dtype, args_class=RewardConfig, gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=None, center_rewards_coefficient=cfg.center_rewards or None, disable_dropout=True,
        eval_strategy="steps" if held else "no", eval_steps=cfg.save_steps if held else None,
        per_device_eval_batch_size=cfg.batch_size)
    trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train),
                            eval_dataset=datasets.Dataset.from_list(held) if held else None, processing_class=tokenizer)
    install_callbacks(trainer, out, desc="rm")
    run_trainer(trainer, ckpt)
    info = {"pairs": len(train), "held_out_pairs": len(held)}
    if held:
        accuracy = final_eval(trainer, "eval_accuracy")["eval_accuracy"]
        info["held_out_accuracy"] = round(accuracy, 4)
        if is_main_process():
            print(f"lorakit rm: held-out pairwise accuracy {accuracy:.3f} on {len(held)} pairs", flush=True)
    return save_run(out, model, tokenizer, cfg, "rm", base, trainer=trainer, new_token_ids=built.new_token_ids,
                    **info)

