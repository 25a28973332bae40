"""Adapters on a loaded model: freeze the base, attach LoRA (peft `LoraConfig`) and trainable token rows (new
embedding rows, and lm_head rows when untied), with every trained parameter kept as an fp32 master weight.
"""
from __future__ import annotations

from typing import Optional

import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model, prepare_model_for_kbit_training
from peft.utils.other import TrainableTokensWrapper

from lora_kit.models.load import check_adapter_files, sharded_by_fsdp


def freeze_base(model, gradient_checkpointing: bool = False):
    """Freeze every base weight for adapter training (and turn on gradient checkpointing if asked).

    A 4/8-bit base in fp16 goes through peft's prepare_model_for_kbit_training, which upcasts the unquantized weights
    (norms, embeddings, head) to fp32 because fp16 overflows. In bf16 or fp32 they stay as loaded, as in plain bf16
    LoRA: the upcast would double the embeddings and head for nothing (0.5 GB on a 1.1B model, BENCHMARKS.md "QLoRA
    memory"), and FSDP needs one dtype per flat parameter anyway (TRL skips it for sharded QLoRA too)."""
    quantized = getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)
    if quantized and model.get_input_embeddings().weight.dtype == torch.float16 and not sharded_by_fsdp():
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _train_in_fp32(model):
    """Trainable parameters (adapters, embedding rows, saved heads) as fp32 master weights whatever the base dtype:
    AdamW updates of a bf16 weight round away. Also lets a head with trainable token rows say it has no bias."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    for m in model.modules():
        # peft's wrapper answers `.weight` (the rows merged in) but not `.bias` while an adapter is active, and TRL's
        # fused LM head (DPO, GRPO) reads both from get_output_embeddings(): a bias-free head says it has none
        if isinstance(m, TrainableTokensWrapper) and isinstance(m.original_module, torch.nn.Linear) \
                and m.original_module.bias is None:
            m.bias = None
    return model


def attach_lora(model, lora, *, trainable_token_indices: Optional[list[int] | dict[str, list[int]]] = None,
                modules_to_save: Optional[list[str]] = None, task_type: str = "CAUSAL_LM",
                gradient_checkpointing: bool = False):
    """Wrap `model` in a PEFT LoRA model; optionally train only chosen embedding rows (saved as just those rows).

    `trainable_token_indices`: a list (rows of embed_tokens) or {module name: rows}, see `token_row_targets`."""
    model = freeze_base(model, gradient_checkpointing)
    config = lora_config(lora, task_type, trainable_token_indices=trainable_token_indices,
                         modules_to_save=modules_to_save)
    return _train_in_fp32(get_peft_model(model, config))


def lora_config(lora, task_type: str = "CAUSAL_LM", *, dropout: Optional[float] = None,
                trainable_token_indices: Optional[list[int] | dict[str, list[int]]] = None,
                modules_to_save: Optional[list[str]] = None) -> LoraConfig:
    """The peft LoraConfig of a recipe's `lora` section (the only place one is built from a recipe): target_modules is
    `all-linear` or comma-separated names; `dropout` overrides the recipe's (PPO's roles run without dropout)."""
    targets = lora.target_modules
    targets = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    extra = {}
    if isinstance(trainable_token_indices, dict):
        extra["trainable_token_indices"] = {k: list(v) for k, v in trainable_token_indices.items()}
    elif trainable_token_indices:
        extra["trainable_token_indices"] = {"embed_tokens": list(trainable_token_indices)}
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout if dropout is None else dropout,
                      target_modules=targets, task_type=task_type, modules_to_save=modules_to_save, **extra)


def continue_lora(model, adapter_dir: str, gradient_checkpointing: bool = False):
    """Load a trained adapter (e.g. `lorakit sft`'s output) onto `model` as the trainable adapter `default`."""
    check_adapter_files(adapter_dir)
    model = freeze_base(model, gradient_checkpointing)
    return _train_in_fp32(PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True))


def token_row_targets(model, rows: list[int]) -> dict[str, list[int]]:
    """{module name: rows} for peft's trainable tokens: the input embedding, plus lm_head when it is not tied to it
    (a tied lm_head follows the embedding's rows by itself)."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n}
    out = {names[id(model.get_input_embeddings())]: list(rows)}
    head = model.get_output_embeddings()
    if head is not None and not getattr(model.config, "tie_word_embeddings", False):
        out[names[id(head)]] = list(rows)
    return out


def attach_token_rows(model, targets: dict[str, list[int]]):
    """Wrap `model` in a PEFT model that trains only the given embedding rows (`token_row_targets`) and nothing else;
    its saved adapter holds just those rows. Trainable rows are kept in fp32 whatever the base dtype."""
    indices = sorted({i for rows in targets.values() for i in rows})
    if any(sorted(set(rows)) != indices for rows in targets.values()):
        raise ValueError("trainable token rows must be the same for every target module")
    return _train_in_fp32(get_peft_model(model, TrainableTokensConfig(token_indices=indices,
                                                                        target_modules=list(targets))))


def allow_partial_token_rows(model):
    """Let adapters on one model differ in which modules carry trainable token rows (PPO: an actor from sft on an
    untied base has embedding and lm_head rows, a reward model's adapter only embedding rows). peft's save and load
    ask every trainable-token module for the adapter at hand and raise KeyError where only another adapter has rows;
    such a module now answers with no rows. Call it again after an adapter has wrapped new modules."""
    def only_own(method, rows):
        return lambda name, *args: method(name, *args) if name in rows.trainable_tokens_delta else {}

    for m in model.modules():
        if isinstance(m, TrainableTokensWrapper) and "adapter_state_dict" not in vars(m):
            m.adapter_state_dict = only_own(m.adapter_state_dict, m.token_adapter)
            m.adapter_state_dict_load_map = only_own(m.adapter_state_dict_load_map, m.token_adapter)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
