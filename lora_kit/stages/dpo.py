"""`lorakit dpo`: direct preference optimisation with TRL's DPOTrainer and a LoRA adapter; the reference model is the
base with the adapter disabled, so only one model is in memory. Prompts are rendered with lorakit's templates.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from lora_kit.data.pairs import read_pairs
from lora_kit.data.records import split_eval
from lora_kit.errors import LorakitError
from lora_kit.models.load import check_vocab, compute_dtype, load_model
from lora_kit.models.lora import freeze_base
from lora_kit.recipe import POSITIVE, DataArgs, LoraArgs, ModelArgs, TrainArgs, arg, section
from lora_kit.templates import segments
from lora_kit.training.run import final_eval, install_callbacks, open_run, save_run, training_arguments


@dataclass
class Config(ModelArgs, DataArgs, TrainArgs):
    """The `lorakit dpo` recipe: model, data, training, LoRA and TRL's DPO loss settings."""
    lora: LoraArgs = section(LoraArgs, "LoRA adapter")
    beta: float = arg(0.1, "DPO temperature: higher keeps the policy closer to the reference (Rafailov et al.: 0.1)",
                      POSITIVE)
    loss_type: str = arg("sigmoid", "TRL DPO loss: sigmoid (DPO) | ipo | hinge | robust ... (comma-separated to mix)")
    label_smoothing: float = arg(0.0, "probability a preference label is flipped (robust DPO); 0 = plain DPO",
                                 "[0, 0.5]")


def render_pairs(groups, tokenizer, template) -> list[dict]:
    """{prompt, chosen, rejected} as text in the training template: the prompt ends with the assistant prefix, each
    answer carries the end-of-turn marker (trailing whitespace dropped so TRL does not append a second EOS)."""
    rows = []
    for group in groups:
        for p in group:
            texts = []
            for answer in (p.chosen, p.rejected):
                segs = segments(tokenizer, template, p.prompt + [{"role": "assistant", "content": answer}])
                texts.append(("".join(t for t, _ in segs[:-1]), segs[-1][0].rstrip()))
            rows.append({"prompt": texts[0][0], "chosen": texts[0][1], "rejected": texts[1][1]})
    return rows


def run(cfg: Config, dry_run: bool = False) -> Path:
    """Train a LoRA adapter with TRL's DPOTrainer on preference pairs; returns the output directory."""
    out, ckpt, base, tokenizer, template = open_run(cfg)
    groups = read_pairs(cfg.data, cfg.max_samples, cfg.skip_bad_records)
    train_groups, held_groups = split_eval(groups, cfg.eval_fraction, cfg.seed)
    train, held = render_pairs(train_groups, tokenizer, template), render_pairs(held_groups, tokenizer, template)
    print(f"lorakit dpo: {cfg.data}: {len(groups)} records -> {len(train)} training pairs, {len(held)} held-out pairs",
          flush=True)

    dtype = compute_dtype(cfg.dtype)
    model = load_model(base, quantization=cfg.quantization, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    check_vocab(model, tokenizer, base)
    if cfg.quantization != "none":
        model = freeze_base(model, cfg.gradient_checkpointing)
    targets = cfg.lora.target_modules
    peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                             task_type="CAUSAL_LM", target_modules="all-linear" if targets == "all-linear" else
                             [t.strip() for t in targets.split(",") if t.strip()])
    print(f"lorakit dpo: {base} ({cfg.quantization}, {str(dtype).replace('torch.', '')}), LoRA r={cfg.lora.r} on "
          f"{targets}; beta={cfg.beta}; {cfg.batch_size * cfg.grad_accum} pairs per step; reference = base with the "
          "adapter disabled", flush=True)
    if dry_run:
        return out

    loss_type = [t.strip() for t in cfg.loss_type.split(",") if t.strip()]
    if not loss_type:
        raise LorakitError("loss_type is empty (sigmoid for plain DPO)")
    # TRL turns bf16 and gradient checkpointing on by default: training_arguments passes lorakit's own choices.
    args = training_arguments(
        cfg, out, dtype, args_class=DPOConfig, gradient_checkpointing=cfg.gradient_checkpointing, beta=cfg.beta,
        loss_type=loss_type, label_smoothing=cfg.label_smoothing, max_length=cfg.cutoff_len,
        truncation_mode="keep_start", eval_strategy="steps" if held else "no",
        eval_steps=cfg.save_steps if held else None,
        per_device_eval_batch_size=cfg.batch_size)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train),
                         eval_dataset=datasets.Dataset.from_list(held) if held else None, processing_class=tokenizer,
                         peft_config=peft_config)
    install_callbacks(trainer, out, desc="dpo")
    trainer.train(resume_from_checkpoint=ckpt)
    info = {"pairs": len(train), "held_out_pairs": len(held)}
    if held:
        metrics = final_eval(trainer, "eval_rewards/margins")
        info["held_out_margin"] = round(metrics.get("eval_rewards/margins", float("nan")), 4)
        info["held_out_accuracy"] = round(metrics.get("eval_rewards/accuracies", float("nan")), 4)
        print(f"lorakit dpo: held-out reward margin {info['held_out_margin']:.3f}, "
              f"accuracy {info['held_out_accuracy']:.3f} on {len(held)} pairs", flush=True)
    return save_run(out, trainer.model, tokenizer, cfg, "dpo", base, trainer=trainer, **info)
