"""`lorakit dpo loss=...`: preference optimisation of a LoRA adapter with TRL's trainers: DPO and its TRL variants
(loss_type), IPO, KTO (unpaired good/bad answers) against the base (TRL's frozen copy of the fresh adapter, whose
B is 0, or the adapter disabled), and the reference-free
ORPO and SimPO (trl.experimental's ORPOTrainer and CPOTrainer). Prompts are rendered with lorakit's templates; every
loss reports the same held-out pairwise accuracy (lora_kit.evaluate.preference).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import set_seed
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from lora_kit.data.pairs import is_unpaired, pair_ids, read_judged, read_pairs
from lora_kit.data.records import fit_to_cutoff, read_records, split_eval
from lora_kit.errors import LorakitError
from lora_kit.evaluate.preference import pairwise_accuracy
from lora_kit.models.builder import build
from lora_kit.models.load import compute_dtype
from lora_kit.recipe import GE0, POSITIVE, DataArgs, LoraArgs, ModelArgs, TrainArgs, arg, section
from lora_kit.templates import encode, segments
from lora_kit.training.run import (
    final_eval,
    install_callbacks,
    is_main_process,
    open_run,
    run_trainer,
    save_run,
    training_arguments,
)

LOSSES = ("dpo", "ipo", "kto", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")  # their implicit reward is the mean log-probability, not a ratio to the reference


@dataclass
class Config(ModelArgs, DataArgs, TrainArgs):
    """The `lorakit dpo` recipe: model, data, training, LoRA, the preference loss and its papers' keys."""
    lora: LoraArgs = section(LoraArgs, "LoRA adapter")
    loss: str = arg("dpo", "dpo (TRL's loss_type) | ipo | kto (unpaired data or pairs) | orpo | simpo (no reference)")
    beta: float = arg(0.1, "β: DPO/KTO temperature (Rafailov et al., Ethayarajh et al.: 0.1), IPO's τ, SimPO's reward "
                           "scale (Meng et al.: 2-2.5)", POSITIVE)
    gamma: float = arg(0.5, "SimPO target margin γ (TRL simpo_gamma; Meng et al. tune γ/β in 0.3-1.6)", GE0)
    orpo_lambda: float = arg(0.1, "ORPO λ, weight of the odds-ratio term beside the SFT loss (Hong et al.: 0.1)",
                             POSITIVE)
    desirable_weight: float = arg(1.0, "KTO λ_D, weight of desirable answers (raise it when they are fewer)", POSITIVE)
    undesirable_weight: float = arg(1.0, "KTO λ_U, weight of undesirable answers", POSITIVE)
    loss_type: str = arg("sigmoid", "loss=dpo: TRL DPO loss sigmoid | hinge | robust | exo_pair | nca_pair | "
                                    "bco_pair | sppo_hard | aot | apo_zero | apo_down | discopop ... (comma = mix)")
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


def trainer_setup(cfg, loss_type: list[str]):
    """(trainer class, its config class, loss-specific arguments) for `cfg.loss`."""
    if cfg.loss in ("dpo", "ipo"):
        return DPOTrainer, DPOConfig, dict(beta=cfg.beta, loss_type=["ipo"] if cfg.loss == "ipo" else loss_type,
                                           label_smoothing=cfg.label_smoothing, truncation_mode="keep_start")
    if cfg.loss == "kto":
        return KTOTrainer, KTOConfig, dict(beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                                           undesirable_weight=cfg.undesirable_weight)
    # lazy: trl.experimental warns on import and is needed only for these losses
    if cfg.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig, dict(beta=cfg.orpo_lambda)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig, dict(loss_type="simpo", cpo_alpha=0.0, beta=cfg.beta, simpo_gamma=cfg.gamma)


def read_data(cfg, tokenizer, template) -> tuple[list[dict], list[dict], str]:
    """(training rows in the loss's format, held-out pairs as text, description). Held-out records are whole records,
    so a held-out pair never shares a prompt with training. Over-long records follow the stages' one rule (dropped with
    overlong=drop; else TRL keeps the first cutoff_len tokens, as `fit_to_cutoff` does; rm and dpo drop a pair that
    cutting leaves with two identical answers)."""
    def fits(pair) -> bool:
        return pair_ids(tokenizer, template, pair, cfg.cutoff_len, cfg.overlong) is not None

    if cfg.loss != "kto":
        if any(is_unpaired(r) for r in read_records(cfg.data)[:1]):
            raise LorakitError(f"{cfg.data}: unpaired records (completion + label) train with loss=kto; "
                               f"loss={cfg.loss} needs chosen/rejected pairs")
        groups = read_pairs(cfg.data, cfg.max_samples, cfg.skip_bad_records)
        train_groups, held_groups = split_eval(groups, cfg.eval_fraction, cfg.seed)
        pairs = [[p for p in g if fits(p)] for g in train_groups]
        train, held = render_pairs(pairs, tokenizer, template), render_pairs(held_groups, tokenizer, template)
        dropped = sum(len(g) for g in train_groups) - len(train)
        return train, held, (f"{len(groups)} records -> {len(train)} training pairs ({dropped} dropped as over-long), "
                             f"{len(held)} held-out pairs")
    groups = read_judged(cfg.data, cfg.max_samples, cfg.skip_bad_records)
    train_groups, held_groups = split_eval(groups, cfg.eval_fraction, cfg.seed)
    train, dropped = [], 0
    for group in train_groups:
        for j in group:
            msgs = j.prompt + [{"role": "assistant", "content": j.completion}]
            if fit_to_cutoff([encode(tokenizer, template, msgs)[0]], cfg.cutoff_len, cfg.overlong) is None:
                dropped += 1
                continue
            segs = segments(tokenizer, template, msgs)
            train.append({"prompt": "".join(t for t, _ in segs[:-1]), "completion": segs[-1][0].rstrip(),
                          "label": j.desirable})
    held = render_pairs([_as_pairs(g) for g in held_groups], tokenizer, template)
    good = sum(r["label"] for r in train)
    return train, held, (f"{len(groups)} records -> {good} desirable + {len(train) - good} undesirable answers "
                         f"({dropped} dropped as over-long), {len(held)} held-out pairs")


def _as_pairs(group):
    """Held-out judged answers of one record as (desirable, undesirable) pairs, for the pairwise accuracy."""
    good, bad = [j for j in group if j.desirable], [j for j in group if not j.desirable]
    return [_Pair(g.prompt, g.completion, b.completion) for g in good for b in bad]


@dataclass
class _Pair:
    prompt: list[dict]
    chosen: str
    rejected: str


def run(cfg: Config, dry_run: bool = False) -> Path:
    """Train a LoRA adapter with the chosen preference loss on TRL's trainers; returns the output directory."""
    if cfg.loss not in LOSSES:
        raise LorakitError(f"loss must be one of {', '.join(LOSSES)}, got '{cfg.loss}'")
    loss_type = [t.strip() for t in cfg.loss_type.split(",") if t.strip()]
    if not loss_type:
        raise LorakitError("loss_type is empty (sigmoid for plain DPO)")
    out, ckpt, base, tokenizer, template = open_run(cfg)
    train, held, described = read_data(cfg, tokenizer, template)
    print(f"lorakit dpo: {cfg.data}: {described}", flush=True)

    dtype = compute_dtype(cfg.dtype)
    set_seed(cfg.seed)  # LoRA A is initialised here, before the trainer seeds anything (resume must match)
    built = build(cfg, base, tokenizer)  # TRL keeps a frozen copy as the reference: the base, since LoRA's B is 0
    model = built.model
    trainer_class, args_class, loss_args = trainer_setup(cfg, loss_type)
    keys = ", ".join(f"{k}={v}" for k, v in loss_args.items() if k not in ("truncation_mode", "label_smoothing"))
    print(f"lorakit dpo: {base} ({cfg.quantization}, {str(dtype).replace('torch.', '')}), LoRA r={cfg.lora.r} on "
          f"{cfg.lora.target_modules}; loss {cfg.loss} ({keys}); {cfg.batch_size * cfg.grad_accum} "
          f"{'answers' if cfg.loss == 'kto' else 'pairs'} per step; reference = "
          f"{'none' if cfg.loss in REFERENCE_FREE else 'base with the adapter disabled'}", flush=True)
    if dry_run:
        return out

    pairwise = cfg.loss != "kto" and bool(held)  # the trainers' own evaluation needs their training format
    # TRL turns bf16 and gradient checkpointing on by default: training_arguments passes lorakit's own choices.
    args = training_arguments(
        cfg, out, dtype, args_class=args_class, gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=cfg.cutoff_len, eval_strategy="steps" if pairwise else "no",
        eval_steps=cfg.save_steps if pairwise else None, per_device_eval_batch_size=cfg.batch_size, **loss_args)
    trainer = trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_list(train),
                            eval_dataset=datasets.Dataset.from_list(held) if pairwise else None,
                            processing_class=tokenizer)
    install_callbacks(trainer, out, desc=cfg.loss)
    run_trainer(trainer, ckpt)
    info = {"loss": cfg.loss, "training_rows": len(train), "held_out_pairs": len(held)}
    if pairwise:
        metrics = final_eval(trainer, "eval_rewards/margins")
        info["held_out_margin"] = round(metrics.get("eval_rewards/margins", float("nan")), 4)
        info["held_out_accuracy"] = round(metrics.get("eval_rewards/accuracies", float("nan")), 4)
    if held:
        acc = pairwise_accuracy(trainer.model, tokenizer, held)
        own = acc["mean_logp_accuracy" if cfg.loss in REFERENCE_FREE else "ratio_accuracy"]
        info.update(held_out_pref_accuracy=round(own, 4), held_out_ratio_accuracy=round(acc["ratio_accuracy"], 4),
                    held_out_mean_logp_accuracy=round(acc["mean_logp_accuracy"], 4))
        if is_main_process():
            print(f"lorakit dpo: held-out pairwise accuracy {own:.3f} ({cfg.loss}'s implicit reward; log-ratio "
                  f"{acc['ratio_accuracy']:.3f}, mean log-prob {acc['mean_logp_accuracy']:.3f}) on {len(held)} pairs",
                  flush=True)
    return save_run(out, trainer.model, tokenizer, cfg, "dpo", base, trainer=trainer,
                    new_token_ids=built.new_token_ids, **info)
